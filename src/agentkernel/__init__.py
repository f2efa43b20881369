"""agentkernel: run AI coding agents and their commands in hardware-isolated microVMs."""

__version__ = "0.1.0"
