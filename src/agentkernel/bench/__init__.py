"""`agentkernel bench`: figures (boot, exec, snapshot, pool: figures.py) and many sandboxes at once
(stress.py). They print measurements; they assert nothing about speed."""

DEFAULT_CONCURRENCY = 6
"""Sandboxes `bench stress` starts at once (here, not in stress.py: the CLI reads it without the rest)."""
