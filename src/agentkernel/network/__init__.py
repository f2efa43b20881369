"""Sandbox networking: the egress policy and the host-side gateway that enforces it."""
