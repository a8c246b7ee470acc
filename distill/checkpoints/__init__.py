"""Checkpoints on disk: layout, completeness and run identity; writing and finding them; loading without running code."""
