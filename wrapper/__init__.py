"""aiso."""
