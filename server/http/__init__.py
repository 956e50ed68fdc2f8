"""deltaserve's OpenAI-compatible HTTP API (FastAPI on uvicorn, in the server process): JSON <-> domain objects."""
