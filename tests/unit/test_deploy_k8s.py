"""deploy/k8s: every kustomization renders, validates offline, and says what we mean it to.

Rendered with the kubectl that `make setup` installs into the venv (scripts/install_tools.sh; its
kustomize is v2.0.3, so the manifests keep to that version's features). Core kinds are checked against
Kubernetes 1.30's schemas in strict mode (an unknown or misspelt field fails), CRDs against the small
schemas in deploy/k8s/schemas/. The policy presets go through our own schema (`check-config`), which
Kubernetes cannot know: a bad policy renders and validates fine there and only our check catches it.
A missing tool fails the test instead of skipping it: CI installs them.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vllm_kvevict.cli import config_cmd
from vllm_kvevict.cli.main import main
from vllm_kvevict.models.smollm2 import default_model_path

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
K8S_VERSION = "1.30.0"  # bundled by kubernetes-validate; clusters older than this are out of support
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/cpu", "ray"]
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.schema.json",
    ("ray.io/v1", "RayCluster"): "raycluster.schema.json",
}
POLICY_PATH = "/etc/kvevict/policy.yaml"


def kustomize(path: Path) -> str:
    assert KUBECTL.exists(), f"{KUBECTL} is missing: run scripts/install_tools.sh .venv (make setup does)"
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed: {out.stderr}"
    return out.stdout


@functools.lru_cache(maxsize=None)
def rendered_text(name: str) -> str:
    return kustomize(K8S / name)


def rendered(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered_text(name)) if d]


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server(name: str) -> tuple[dict, dict]:
    """(pod spec, server container) of a kustomization's vLLM server."""
    docs = rendered(name)
    if name == "ray":
        pod = only(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
        return pod, next(c for c in pod["containers"] if c["name"] == "ray-head")
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "vllm")


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    return []


def validate_core(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {where}: {exc.message}")


def crd_validator(key: tuple[str, str]) -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# ---- every kustomization renders and validates -----------------------------------------------------
def test_every_kustomization_is_covered():
    found = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates(name):
    docs = rendered(name)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            errors = sorted(crd_validator(key).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
            )
        else:
            validate_core(doc)
        # pod templates inside CRDs get Kubernetes' own PodTemplateSpec schema too
        for i, template in enumerate(pod_templates(doc) if key in CRD_SCHEMAS else []):
            validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{doc['metadata']['name']}-{i}"}, "template": template})


def test_crd_schemas_reject_what_they_should():
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "m"},
               "spec": {"selector": {"matchLabels": {"a": "b"}}, "podMetricsEndpoints": [{"port": "http", "path": "/metrics"}]}}
    check = crd_validator(("monitoring.coreos.com/v1", "PodMonitor"))
    assert check.is_valid(monitor)
    assert not check.is_valid({**monitor, "spec": {"selector": {"matchLabels": {"a": "b"}}}})
    assert not check.is_valid({**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": [{"port": 8000, "path": "/metrics"}]}})
    ray = only(rendered("ray"), "RayCluster")
    check = crd_validator(("ray.io/v1", "RayCluster"))
    assert check.is_valid(ray)
    bad = json.loads(json.dumps(ray))
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 2  # KubeRay wants strings
    assert not check.is_valid(bad)
    bad = json.loads(json.dumps(ray))
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    assert not check.is_valid(bad)


# ---- what the manifests say ------------------------------------------------------------------------
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_check_health_on_the_server_port(name):
    pod, container = server(name)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000
    assert "--port 8000" in " ".join(container["args"])  # the Ray head's args are one shell script
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] == "/health" and ports[probe["port"]] == 8000, kind
    # model loading: the startup probe allows minutes before liveness may restart the server
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert container["livenessProbe"]["failureThreshold"] >= 3


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_service_and_podmonitor_reach_the_server(name):
    docs = rendered(name)
    labels = (only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"] if name != "ray"
              else {"ray.io/cluster": only(docs, "RayCluster")["metadata"]["name"], "ray.io/node-type": "head"})
    service = only(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = only(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0] | {"interval": None} == {"port": "http", "path": "/metrics", "interval": None}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_policy_configmap_is_mounted_and_passes_our_schema(name, tmp_path):
    docs = rendered(name)
    pod, container = server(name)
    args = " ".join(container["args"])
    assert f"--kv-config {POLICY_PATH}" in args
    mount = next(m for m in container["volumeMounts"] if POLICY_PATH.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = only(docs, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name, where kustomize hashes
    assert "policy.yaml" in cm["data"]
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered_text(name))
    [(where, config)] = config_cmd.check_file(str(out))
    assert "policy.yaml" in where
    if name in ("base", "overlays/cpu"):
        assert (config.policy, config.budget) == ("ada-snapkv", 1024)
    else:
        # CUDA refuses every policy but `none` at start-up in this release (integration/vllm/engine_config.py)
        assert config.policy == "none"


@pytest.mark.parametrize("name", ["base", "overlays/gpu", "overlays/cpu"])
def test_init_container_prepares_the_model_the_server_loads(name):
    pod, container = server(name)
    [init] = pod["initContainers"]
    assert init["command"][:2] == ["vllm-kvevict", "model"] and init["image"] == container["image"]
    cache = init["command"][init["command"].index("--cache-dir") + 1]
    assert container["command"] == ["vllm", "serve"]
    assert container["args"][0] == str(default_model_path(Path(cache)))
    claim = {v["name"]: v for v in pod["volumes"]}
    for c in (init, container):
        [m] = [m for m in c["volumeMounts"] if m["mountPath"] == cache]
        assert "persistentVolumeClaim" in claim[m["name"]]
    assert only(rendered(name), "Deployment")["spec"]["strategy"]["type"] == "Recreate"  # RWO volume


def test_gpu_overlay_requests_a_gpu():
    pod, container = server("overlays/gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["image"] == "vllm-kvevict:0.1.0"
    assert "--dtype" not in container["args"]


def test_cpu_overlay_runs_fp32_eager_with_an_explicit_kv_pool():
    _, container = server("overlays/cpu")
    args = container["args"]
    assert args[args.index("--dtype") + 1] == "float32" and "--enforce-eager" in args
    assert args[:2] == server("base")[1]["args"][:2]  # appended, the base's args kept
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1
    res = container["resources"]
    assert res["requests"] == res["limits"] and int(res["requests"]["cpu"]) >= 4
    assert "nvidia.com/gpu" not in res["limits"]
    assert container["image"] == "vllm-kvevict:0.1.0-cpu"


def test_ray_cluster_has_the_gpus_its_parallelism_needs():
    cluster = only(rendered("ray"), "RayCluster")
    _, head = server("ray")
    script = head["args"][0]
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend ray",
                 f"--kv-config {POLICY_PATH}", "$KUBERAY_GEN_RAY_START_CMD"):
        assert flag in script
    env = {e["name"]: e["value"] for e in head["env"]}
    gpus = head["resources"]["limits"]["nvidia.com/gpu"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        [worker] = group["template"]["spec"]["containers"]
        gpus += group["replicas"] * worker["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env["TP"]) * int(env["PP"]) == gpus
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    out = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---- check-config: the negative case and the CLI --------------------------------------------------
def test_bad_policy_renders_and_passes_kubernetes_but_fails_check_config(tmp_path, capsys):
    overlay = tmp_path / "bad"
    overlay.mkdir()
    # kustomize v2.0.3 refuses absolute bases; a relative path may leave the overlay's root
    (overlay / "kustomization.yaml").write_text(
        f"bases:\n  - {os.path.relpath(K8S / 'base', overlay)}\npatchesStrategicMerge:\n  - policy.yaml\n"
    )
    (overlay / "policy.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: vllm-kvevict-policy\n"
        "data:\n  policy.yaml: |\n    kv_policy: not-a-policy\n    kv_budget: 1024\n"
    )
    text = kustomize(overlay)
    docs = [d for d in yaml.safe_load_all(text) if d]
    cm = only(docs, "ConfigMap")
    assert "not-a-policy" in cm["data"]["policy.yaml"]
    validate_core(cm)  # Kubernetes sees nothing wrong
    out = tmp_path / "rendered.yaml"
    out.write_text(text)
    with pytest.raises(ValueError) as err:
        config_cmd.check_file(str(out))
    msg = str(err.value)
    assert str(out) in msg and cm["metadata"]["name"] in msg and "'policy.yaml'" in msg
    assert "kv_policy='not-a-policy' is unknown: expected one of" in msg and "ada-snapkv" in msg
    assert main(["check-config", str(out)]) == 2
    assert "not-a-policy" in capsys.readouterr().err


def test_check_config_passes_every_shipped_preset(capsys):
    from vllm_kvevict.policies.registry import POLICIES

    files = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(Path(f).stem for f in files) == sorted(POLICIES)  # one preset per registered policy
    assert main(["check-config", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files) and all(line.startswith("OK ") for line in lines)


def test_check_config_names_file_key_and_value(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("policy: snapkv\nbudget: 256\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: snapkv\nbudget: 256\npooling: median\n")
    assert main(["check-config", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"OK {good}: snapkv, budget 256" in out
    assert str(bad) in err and "'median'" in err and "'max'" in err  # the bad value and what is allowed
    assert "1 of 2 file(s) failed" in err


def test_check_config_reads_kubernetes_yaml_from_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(rendered_text("overlays/cpu")))
    assert main(["check-config", "-"]) == 0
    assert "ada-snapkv, budget 1024" in capsys.readouterr().out


def test_check_config_refuses_kubernetes_yaml_without_a_preset(tmp_path):
    only_service = tmp_path / "svc.yaml"
    only_service.write_text((K8S / "base" / "service.yaml").read_text())
    with pytest.raises(ValueError, match="no policy preset found"):
        config_cmd.check_file(str(only_service))
