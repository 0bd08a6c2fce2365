"""svpo_trl.trainer."""
