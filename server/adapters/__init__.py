"""Adapter administration below the gRPC layer: load, unload, list and describe served adapters."""
