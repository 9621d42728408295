"""Kubernetes manifests (deploy/k8s/): rendered, schema-validated offline, and checked for what the shapes promise.

No cluster runs here. What is checked instead:
- `rendered/<shape>.yaml` is what kustomize makes of the overlay today (when kubectl or kustomize
  is installed; the rendered files are what CI validates either way);
- every object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: an
  unknown field is an error), for the oldest and a recent supported Kubernetes;
- both shapes carry probes on /readyz and /healthz, resources, a PodDisruptionBudget, a CPU HPA for
  the root, ConfigMaps for root.yaml and allowlists.yaml, bundles from a volume, and a grace period
  that covers preStop plus the root's own drain (timeouts.drain_s, read with root.config);
- the sidecar shapes keep the model server on loopback and out of every Service;
- the root.yaml in each ConfigMap loads with the root's own config loader, mounted as kubelet mounts
  it (the `..data` symlink layout), with the other ConfigMaps at their mount paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from root.config import load_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SHAPES = ("two-tier", "sidecar", "sidecar-triton")
SIDECARS = {"sidecar": ("model", "8001"), "sidecar-triton": ("triton", "8000")}
K8S_VERSIONS = ("1.30.0", "1.33.0")  # 1.30: ContainerResource HPA metrics are GA


def _docs(shape: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / "rendered" / f"{shape}.yaml").read_text()) if d]


def _kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(hits) == 1, f"expected one {kind} {name}*, found {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def _container(deploy: dict, name: str) -> dict:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def _prestop_s(container: dict) -> float:
    cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    return float(cmd[1])


def _materialise(cm: dict, mount: Path) -> None:
    """Write a ConfigMap the way kubelet mounts it: files in a timestamped dir, `..data` -> it, name -> ..data/name."""
    mount.mkdir(parents=True, exist_ok=True)
    ts = mount / "..2026_01_01_00_00_00.000000001"
    ts.mkdir()
    for key, value in cm["data"].items():
        (ts / key).write_text(value)
    os.symlink(ts.name, mount / "..data")
    for key in cm["data"]:
        os.symlink(f"..data/{key}", mount / key)


def _root_config(docs: list[dict], tmp_path: Path):
    """Load root.yaml from its ConfigMap with root.config, every ConfigMap volume mounted under tmp_path."""
    deploy = _one(docs, "Deployment", "trimmer-root")
    spec = deploy["spec"]["template"]["spec"]
    root = _container(deploy, "root")
    cms = {d["metadata"]["name"]: d for d in _kind(docs, "ConfigMap")}
    volumes = {v["name"]: v for v in spec["volumes"]}
    remap: dict[str, str] = {}
    config_file = None
    for m in root["volumeMounts"]:
        vol = volumes[m["name"]]
        if "configMap" not in vol:
            continue
        cm = cms[vol["configMap"]["name"]]
        target = tmp_path / m["name"]
        _materialise(cm, target)
        if "subPath" in m:
            remap[m["mountPath"]] = str(target / m["subPath"])
            if m["subPath"] == "root.yaml":
                config_file = m["mountPath"]
        else:
            remap[m["mountPath"]] = str(target)
    assert config_file is not None, "root.yaml is not mounted from a ConfigMap"
    assert root["args"] == ["--config", config_file]
    text = Path(remap[config_file]).read_text()
    for mount_path, local in sorted(remap.items(), key=lambda kv: -len(kv[0])):
        if mount_path != config_file:
            text = text.replace(mount_path, local)
    local_cfg = tmp_path / "root.yaml"
    local_cfg.write_text(text)
    return load_config(local_cfg)


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_manifests_are_current(shape: str) -> None:
    cmd = _kustomize()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl installed: the checked-in rendered/ files are validated instead")
    r = subprocess.run([*cmd, str(K8S / "overlays" / shape)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rendered = (K8S / "rendered" / f"{shape}.yaml").read_text()
    body = "".join(ln for ln in rendered.splitlines(keepends=True) if not ln.startswith("# Generated by"))
    assert body == r.stdout, f"deploy/k8s/rendered/{shape}.yaml is stale: run deploy/k8s/render.sh"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_manifests_validate_against_kubernetes_schemas(shape: str, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed ([dev] extra)")
    docs = _docs(shape)
    assert docs
    for d in docs:
        kv.validate(d, version, strict=True)  # raises ValidationError naming the field


def test_schema_validation_can_fail() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    deploy = _one(_docs("two-tier"), "Deployment", "trimmer-root")
    bad = yaml.safe_load(yaml.safe_dump(deploy))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_root_probes_resources_drain(shape: str, tmp_path: Path) -> None:
    docs = _docs(shape)
    deploy = _one(docs, "Deployment", "trimmer-root")
    spec = deploy["spec"]["template"]["spec"]
    root = _container(deploy, "root")
    ports = {p["name"]: p["containerPort"] for p in root["ports"]}
    assert root["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert root["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for c in spec["containers"] + spec.get("initContainers", []):
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]

    cfg = _root_config(docs, tmp_path)
    assert cfg.port == ports["http"] and cfg.host == "0.0.0.0"
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= _prestop_s(root) + cfg.timeouts.drain_s + 1, "grace period shorter than preStop + drain_s"
    assert cfg.watch and cfg.overrides is not None and cfg.bundles

    # /metrics on the admin listener, which Prometheus scrapes and the Service does not expose.
    assert cfg.admin_enabled and cfg.admin_host == "0.0.0.0" and cfg.admin_port == ports["admin"]
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == cfg.admin_port
    assert ann["prometheus.io/path"] == "/metrics"
    svc = _one(docs, "Service", "trimmer-root")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("shape", SHAPES)
def test_pdb_hpa_configmaps(shape: str) -> None:
    docs = _docs(shape)
    deploy = _one(docs, "Deployment", "trimmer-root")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    pdb = _one(docs, "PodDisruptionBudget", "trimmer-root")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler", "trimmer-root")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "trimmer-root"}
    assert hpa["spec"]["minReplicas"] >= 2  # with maxUnavailable 1 in the PDB, a drain never empties the service
    (metric,) = hpa["spec"]["metrics"]
    resource = metric.get("resource") or metric.get("containerResource")
    assert resource["name"] == "cpu"
    if shape in SIDECARS:
        assert metric["type"] == "ContainerResource" and resource["container"] == "root"

    cms = {d["metadata"]["name"]: d for d in _kind(docs, "ConfigMap")}
    assert "allowlists.yaml" in cms["trimmer-allowlists"]["data"]  # fixed name: hot-reloaded in place
    assert "bundle.json" in cms["trimmer-bundles"]["data"]
    (root_cm,) = [n for n in cms if n.startswith("trimmer-root-config-")]  # hash suffix: an edit rolls the pods
    assert "root.yaml" in cms[root_cm]["data"]
    yaml.safe_load(cms["trimmer-allowlists"]["data"]["allowlists.yaml"])


def test_two_tier_leaf(tmp_path: Path) -> None:
    docs = _docs("two-tier")
    leaf = _one(docs, "Deployment", "trimmer-leaf")
    c = _container(leaf, "leaf")
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["lifecycle"]["preStop"]
    svc = _one(docs, "Service", "trimmer-leaf")
    assert svc["spec"]["selector"].items() <= leaf["spec"]["template"]["metadata"]["labels"].items()
    _one(docs, "PodDisruptionBudget", "trimmer-leaf")
    cfg = _root_config(docs, tmp_path)
    port = svc["spec"]["ports"][0]["port"]
    assert cfg.partitions["leaves"].replicas == (f"http://{svc['metadata']['name']}:{port}",)


@pytest.mark.parametrize("shape", sorted(SIDECARS))
def test_sidecar_model_server_private_to_pod(shape: str, tmp_path: Path) -> None:
    name, port = SIDECARS[shape]
    docs = _docs(shape)
    deploy = _one(docs, "Deployment", "trimmer-root")
    server = _container(deploy, name)
    args = " ".join(server["args"])
    assert "127.0.0.1" in args and "0.0.0.0" not in args
    assert "ports" not in server  # not published; no Service targets it
    for svc in _kind(docs, "Service"):
        assert all(str(p["targetPort"]) != port for p in svc["spec"]["ports"])
    # Probes run inside the container: the kubelet's httpGet targets the pod IP, where nothing listens.
    assert "exec" in server["readinessProbe"] and "exec" in server["livenessProbe"]
    cfg = _root_config(docs, tmp_path)
    (part,) = cfg.partitions.values()
    assert part.replicas == (f"http://127.0.0.1:{port}",)
    # The model server keeps serving until the root has drained.
    root = _container(deploy, "root")
    assert _prestop_s(server) >= _prestop_s(root) + cfg.timeouts.drain_s
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > _prestop_s(server)
