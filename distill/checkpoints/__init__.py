"""Checkpoints on disk: layout, completeness and run identity; loading them without running code."""
