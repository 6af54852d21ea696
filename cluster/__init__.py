"""rayprune: cluster."""
