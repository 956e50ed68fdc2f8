"""gRPC services: translate protobuf to domain objects and back; nothing else."""
