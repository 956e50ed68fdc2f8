"""Who may call: API keys (constant-time) and TLS material, shared by the gRPC and HTTP services."""
