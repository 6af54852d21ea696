"""rayprune: orchestrator."""
