"""Coding agents in sandboxes (`agent run`) and agentkernel plugins for their configs (`plugin`)."""
