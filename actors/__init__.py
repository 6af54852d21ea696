"""rayprune: actors."""
