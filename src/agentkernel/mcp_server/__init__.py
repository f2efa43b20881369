"""The MCP server: agentkernel's tools for agents (named so as not to shadow the `mcp` SDK)."""
