"""The host side of the guest protocol (docs/protocol.md): frame codec and agent connections."""
