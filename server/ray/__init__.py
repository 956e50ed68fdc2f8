"""deltaserve on Ray Serve: one engine per replica, adapters as multiplexed models, one ingress for gRPC and HTTP."""
