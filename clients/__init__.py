"""Python client (sync and asyncio) and the deltactl CLI."""
