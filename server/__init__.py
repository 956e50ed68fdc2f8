"""deltaserve: the inference server (config, model, engine, deltas, gRPC service)."""
