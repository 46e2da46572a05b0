"""The cluster configs in clusters/: the `ray up` files against the schema Ray ships, the KubeRay
manifest's required fields, and in every file token authentication, no public dashboard and the
project installed on each node. Reads files only; starts nothing."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_UP_FILES = ["onprem.yaml", "aws.yaml"]
KUBERAY_FILE = "kuberay.yaml"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    """ray/autoscaler/ray-schema.json, located without importing ray (which takes seconds)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


# --- `ray up` files ---------------------------------------------------------------------------------


def ray_start(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_file_matches_rays_schema(name, ray_schema):
    config = load(name)
    errors = sorted(jsonschema.Draft7Validator(ray_schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path)) or '<top>'}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_head_starts_with_token_auth_and_no_public_dashboard(name):
    starts = ray_start(load(name)["head_start_ray_commands"])
    assert len(starts) == 1, starts
    cmd = starts[0]
    for part in (
        "RAY_AUTH_MODE=token ray start --head",
        "--port=6379",
        "--autoscaling-config=~/ray_bootstrap_config.yaml",
        "--disable-usage-stats",
    ):
        assert part in cmd, f"{part!r} missing from {cmd!r}"
    host = re.search(r"--dashboard-host[= ](\S+)", cmd)
    assert "--include-dashboard=false" in cmd or (host and host.group(1) in LOOPBACK), cmd
    assert not host or host.group(1) in LOOPBACK, f"dashboard bound to {host.group(1)}"


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_workers_join_the_head_with_token_auth(name):
    starts = ray_start(load(name)["worker_start_ray_commands"])
    assert len(starts) == 1, starts
    cmd = starts[0]
    for part in ("RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379", "--disable-usage-stats"):
        assert part in cmd, f"{part!r} missing from {cmd!r}"
    assert "--head" not in cmd


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_every_node_gets_the_token_and_the_project(name):
    config = load(name)
    assert "~/.ray/auth_token" in config.get("file_mounts", {}), "the token is not copied to the nodes"
    # A node type's own worker_setup_commands replace the global setup_commands on its nodes.
    setups = {"(all)": config.get("setup_commands", [])}
    for node_type, spec in config.get("available_node_types", {}).items():
        if "worker_setup_commands" in spec:
            setups[node_type] = spec["worker_setup_commands"]
    for where, commands in setups.items():
        text = "\n".join(commands)
        assert re.search(r"pip install .*gns[-_]sweep", text), f"{where}: gns-sweep is not installed"
        assert "torch==" in text, f"{where}: torch is not installed"


def test_onprem_lists_its_machines_and_no_node_types():
    config = load("onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert isinstance(provider["worker_ips"], list) and provider["worker_ips"]
    # `ray up` refuses these for the local provider (it makes its one node type itself).
    for field in ("available_node_types", "head_node_type", "head_node", "worker_nodes"):
        assert field not in config, f"the local provider rejects {field}"


def test_aws_has_a_cpu_and_a_gpu_worker_type():
    config = load("aws.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    gpu = [n for n, s in workers.items() if s["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, s in workers.items() if s["resources"].get("GPU", 0) == 0 and s["resources"].get("CPU", 0) >= 1]
    assert gpu and cpu, f"GPU types {gpu}, CPU types {cpu}"
    for name, spec in workers.items():
        assert 0 <= spec.get("min_workers", 0) <= spec["max_workers"], name
        assert spec["node_config"].get("InstanceType"), name


# --- KubeRay manifest -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTERS / KUBERAY_FILE).read_text()) if d]


@pytest.fixture(scope="module")
def raycluster(docs) -> dict:
    found = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(found) == 1, f"{len(found)} RayCluster documents"
    return found[0]


def groups(rc: dict) -> list[tuple[str, dict]]:
    spec = rc["spec"]
    return [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec["workerGroupSpecs"]]


def containers(group: dict) -> list[dict]:
    pod = group["template"]["spec"]
    return pod["containers"] + pod.get("initContainers", [])


def test_raycluster_required_fields(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["metadata"]["name"]
    head = raycluster["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    workers = raycluster["spec"]["workerGroupSpecs"]
    assert isinstance(workers, list) and workers
    names = [g["groupName"] for g in workers]
    assert len(set(names)) == len(names) and all(names), names
    for name, group in groups(raycluster):
        assert isinstance(group["rayStartParams"], dict), name
        # KubeRay's rayStartParams is map[string]string: a bare number or boolean is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        cs = group["template"]["spec"]["containers"]
        assert cs and all(c.get("name") and c.get("image") for c in cs), name
    for group in workers:
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(n, int) for n in counts), (group["groupName"], counts)
        assert counts[0] <= counts[1] <= counts[2], (group["groupName"], counts)


def test_raycluster_has_a_cpu_and_a_gpu_group(raycluster):
    def gpus(group: dict) -> int:
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        return int(limits.get("nvidia.com/gpu", 0))

    workers = raycluster["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in workers if gpus(g) >= 1], "no group with nvidia.com/gpu in its limits"
    assert [g["groupName"] for g in workers if gpus(g) == 0], "no CPU-only group"


def test_every_container_has_token_auth(raycluster):
    for name, group in groups(raycluster):
        for c in containers(group):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}/{c['name']}: RAY_AUTH_MODE"
            token = env.get("RAY_AUTH_TOKEN", {})
            assert token.get("value") or token.get("valueFrom", {}).get("secretKeyRef"), (
                f"{name}/{c['name']}: RAY_AUTH_TOKEN"
            )


def test_raycluster_dashboard_and_services_stay_private(raycluster, docs):
    head = raycluster["spec"]["headGroupSpec"]
    params = head["rayStartParams"]
    # Without dashboard-host KubeRay binds the dashboard to 0.0.0.0.
    assert params.get("dashboard-host") in LOOPBACK or params.get("include-dashboard") == "false", params
    for name, group in groups(raycluster):
        assert group["rayStartParams"].get("dashboard-host") in (None, *LOOPBACK), name
        assert group["rayStartParams"].get("disable-usage-stats") == "true", name
    assert head.get("serviceType", "ClusterIP") not in PUBLIC_SERVICE_TYPES
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") not in PUBLIC_SERVICE_TYPES
    assert head.get("enableIngress") is not True
    for d in docs:
        assert d.get("kind") != "Ingress"
        if d.get("kind") == "Service":
            assert d.get("spec", {}).get("type", "ClusterIP") not in PUBLIC_SERVICE_TYPES, d["metadata"]


# --- all files ----------------------------------------------------------------------------------------


def test_one_ray_version_everywhere(raycluster):
    """The nodes' Ray must match across the files (and the driver's); one pin to change."""
    versions = {"kuberay.yaml rayVersion": raycluster["spec"]["rayVersion"]}
    for name in RAY_UP_FILES:
        pins = re.findall(r"ray\[default\]==([\w.]+)", "\n".join(load(name)["setup_commands"]))
        assert pins, f"{name}: Ray is not pinned"
        versions |= {f"{name} setup_commands #{i}": v for i, v in enumerate(pins)}
    bases = re.findall(r"rayproject/ray:([\d.]+)-", (CLUSTERS / "Dockerfile").read_text())
    assert bases
    versions |= {f"Dockerfile base image #{i}": v for i, v in enumerate(bases)}
    assert len(set(versions.values())) == 1, versions
