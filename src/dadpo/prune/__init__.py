"""The prune stage."""
