"""svpo_trl.search."""
