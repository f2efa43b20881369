"""Backends: how each kind of sandbox is started, reached and stopped. All share kernel, images, agent.

Each backend is a subpackage (qemu/, firecracker/, container/) whose `__init__` declares it to the
registry (registry.py); what they share lives in base.py.
"""

from __future__ import annotations

from agentkernel.backends.registry import get_backend

__all__ = ["get_backend"]
