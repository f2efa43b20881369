"""Hypothesis settings for these tests: no example database in the working tree, and no per-example
deadline (the machines running the tests are shared and slow)."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("agentkernel", database=None, deadline=None)
settings.load_profile("agentkernel")
