"""The adapter store: format readers, validation against the served model, registry."""
