"""Sandboxes: their records, their directories and their life cycle on a backend."""
