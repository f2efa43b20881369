"""The HTTP API: FastAPI routes over the sandbox service, with problem-details errors."""
