"""`agentkernel bench`: figures (boot, exec, snapshot, pool: figures.py) and many sandboxes at once
(stress.py). They print measurements; they assert nothing about speed."""
