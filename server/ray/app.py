"""The Ray Serve application: `import_path: server.ray.app:build_app` in a Serve config file, its `args:` the
RayAppSettings. Replicas, autoscaling and devices per replica are the config's `deployments:` overrides of
DeltaEngine and DeltaIngress (see deploy/ray/serve.yaml)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from server.ray.engine import DeltaEngine
from server.ray.ingress import DeltaIngress
from server.ray.settings import RayAppSettings

# What Ray's gRPC proxy registers (grpc_options.grpc_servicer_functions): the ingress implements their methods.
GRPC_SERVICER_FUNCTIONS = [
    "deltaserve.v1.generation_pb2_grpc.add_GenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def build_app(args: dict[str, Any]) -> Application:
    """The ingress over the engine deployment; bad arguments fail here, before any replica starts."""
    settings = RayAppSettings.from_args(args).to_args()
    return DeltaIngress.bind(DeltaEngine.bind(settings), settings)
