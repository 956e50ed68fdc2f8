"""Issue 14, acceptance 3 (the parts that need no image build): the Dockerfile passes hadolint with nothing above
warning level and has what the image must have; the Kubernetes manifests pass yamllint and validate against the
Kubernetes schemas (kubernetes-validate, offline), with one GPU per pod, native gRPC probes and Secrets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
MANIFESTS = ["deployment.yaml", "service.yaml", "pvc.yaml"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (the test extra of pyproject.toml has it)")
    return str(path)


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_hadolint_reports_no_warning_nor_error():
    run = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_has_what_the_image_needs():
    steps = _instructions()
    args = [value for op, value in steps if op == "ARG"]
    assert steps[0][0] == "ARG" and args[0].startswith("BASE_IMAGE=pytorch/pytorch:") and "cuda" in args[0]
    assert ("FROM", "${BASE_IMAGE}") in steps
    runs = " ".join(value for op, value in steps if op == "RUN")
    assert "pip install -q -r deploy/requirements.txt" in runs and "default_model_dir" in runs
    assert any(op == "COPY" and value.startswith("examples/adapters") for op, value in steps)
    user = [value for op, value in steps if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert set(" ".join(value for op, value in steps if op == "EXPOSE").split()) == {"50051", "8000", "9400"}
    assert any(op == "HEALTHCHECK" and '"deltactl", "health"' in value for op, value in steps)
    assert steps[-1] == ("CMD", '["deltaserve", "serve"]')
    assert "ca-certificates.crt" not in (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_yamllint():
    run = subprocess.run([_tool("yamllint"), "-s", "-c", str(K8S / ".yamllint.yaml"), str(K8S)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_manifests_validate_against_the_kubernetes_schemas():
    run = subprocess.run([_tool("kubernetes-validate"), "--strict", *MANIFESTS], cwd=K8S, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed") == len(MANIFESTS)


def test_deployment_uses_a_gpu_grpc_probes_a_volume_and_secrets():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text(encoding="utf-8"))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["DELTASERVE_ADAPTERS_DIR"]["value"] == mounts["adapters"]
    assert env["DELTASERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"]
    key_file = container["args"][container["args"].index("--api-key-file") + 1]
    assert key_file.startswith(mounts["api-keys"] + "/")
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_exposes_the_three_ports():
    service = yaml.safe_load((K8S / "service.yaml").read_text(encoding="utf-8"))
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "http": 8000, "metrics": 9400}
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text(encoding="utf-8"))
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_ray_service_pods_validate_and_its_serve_config_is_the_applications():
    """Issue 15: KubeRay's RayService is a custom resource (no schema offline), so its pod templates are validated
    as Pods, and serveConfigV2 with Ray Serve's own schema and the application's arguments."""
    schema = pytest.importorskip("ray.serve.schema")
    from server.ray.settings import RayAppSettings

    service = yaml.safe_load((K8S / "ray-service.yaml").read_text(encoding="utf-8"))
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{i}"}, "spec": template["spec"]}
            for i, template in enumerate(templates)]
    run = subprocess.run([_tool("kubernetes-validate"), "--strict", "-"], input=yaml.safe_dump_all(pods),
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.count("passed") == len(pods), run.stdout + run.stderr
    (worker,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    local = schema.ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text()))
    assert config.grpc_options.grpc_servicer_functions == local.grpc_options.grpc_servicer_functions
    (app,) = config.applications
    assert app.import_path == "server.ray.app:build_app"
    engine = next(d for d in app.deployments if d.name == "DeltaEngine")
    assert engine.ray_actor_options.num_gpus == 1 and engine.autoscaling_config["max_replicas"] >= 1
    store = app.args.pop("adapters_store")
    RayAppSettings.from_args(app.args)   # every other argument, the engine's settings included, is valid
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {store}
