"""The recover stage."""
