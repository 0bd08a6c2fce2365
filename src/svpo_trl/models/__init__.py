"""svpo_trl.models."""
