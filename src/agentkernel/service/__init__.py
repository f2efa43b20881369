"""The service layer: the one implementation that the CLI, the HTTP API and the MCP server call."""
