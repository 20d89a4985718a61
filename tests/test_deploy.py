"""deploy/: the container, Kubernetes manifests, alert rules, dashboard and compose file hold together.

Static checks parse every file; the live check runs a real worker against the broker and the emulator
and holds every metric name the deploy files mention against the worker's own /metrics output.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.kafka_support import TopicFactory, produce
from tests.stack import EmulatorProcess, WorkerFactory, wait_until
from worker.config import Settings, load_settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "personalize-worker.json"
METRIC_NAME = re.compile(r"personalize_worker_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian package 'prometheus'; `make test` installs it as root)"
)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s by kind (one of each kind is expected)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def configmap_settings(tmp_path: Path) -> Settings:
    toml = manifests()["ConfigMap"]["data"]["worker.toml"]
    path = tmp_path / "worker.toml"
    path.write_text(toml, encoding="utf-8")
    env = {"PW_KAFKA__SASL_PASSWORD": "from-the-secret", "PW_KAFKA__GROUP_INSTANCE_ID": "pod-0"}
    return load_settings(path, environ=env)


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names in alerts, dashboard and manifests → the files that mention them."""
    sources = [ALERTS, DASHBOARD, *sorted(K8S.glob("*.yaml")), DEPLOY / "docker-compose.yml"]
    names: dict[str, set[str]] = {}
    for path in sources:
        for name in METRIC_NAME.findall(path.read_text(encoding="utf-8")):
            names.setdefault(name, set()).add(path.name)
    return names


def exposed_names(metrics_text: str) -> set[str]:
    """Family names from `# TYPE` lines (present even without samples) plus every sample name."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def missing_names(referenced: dict[str, set[str]], exposed: set[str]) -> dict[str, set[str]]:
    def known(name: str) -> bool:
        if name in exposed:
            return True
        base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
        return base in exposed or f"{base}_total" in exposed

    return {name: files for name, files in referenced.items() if not known(name)}


# --- static -----------------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in documents(ALERTS)[0]["groups"] for rule in group["rules"]}
    assert {
        "PersonalizeWorkerDown",
        "PersonalizeWorkerAbsent",
        "PersonalizeWorkerLagGrowing",
        "PersonalizeWorkerNoCommitProgress",
        "PersonalizeWorkerDeadLetterRate",
        "PersonalizeWorkerThrottled",
        "PersonalizeWorkerCallErrors",
        "PersonalizeWorkerStalled",
        "PersonalizeWorkerDeadLetterBlocked",
        "PersonalizeWorkerSourceTopicMissing",
    } <= alerts


@needs_promtool
def test_sample_prometheus_config_passes_promtool() -> None:
    assert PROMTOOL is not None
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in documents(config)[0]["scrape_configs"]}
    assert "personalize-worker" in jobs  # the alerts select job="personalize-worker"


def test_kustomization_lists_existing_files_and_not_the_example_secret() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in resources
    assert {p.name for p in K8S.glob("*.yaml")} - set(resources) == {"kustomization.yaml", "secret.example.yaml"}


def test_deployment_probes_security_and_grace_period(tmp_path: Path) -> None:
    objects = manifests()
    settings = configmap_settings(tmp_path)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > settings.worker.drain_timeout_seconds
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == settings.metrics.port == 9108
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["args"] == ["--config", "/etc/personalize-worker/worker.toml"]
    assert {"limits", "requests"} <= container["resources"].keys()
    env = {e["name"]: e for e in container["env"]}
    assert env["PW_KAFKA__GROUP_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "secretKeyRef" in env["PW_KAFKA__SASL_PASSWORD"]["valueFrom"]
    assert not [name for name in env if name.startswith("AWS_") and ("KEY" in name or "TOKEN" in name)]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/personalize-worker"] == "config"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert objects["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )


def test_configmap_toml_is_a_valid_worker_config_without_secrets(tmp_path: Path) -> None:
    settings = configmap_settings(tmp_path)
    assert settings.kafka.group_instance_id == "pod-0"
    toml = manifests()["ConfigMap"]["data"]["worker.toml"]
    assert not re.search(r"^\s*sasl_password\s*=", toml, re.MULTILINE)


def test_keda_scales_on_lag_of_the_workers_group_within_the_partition_count(tmp_path: Path) -> None:
    objects = manifests()
    settings = configmap_settings(tmp_path)
    scaled = objects["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == settings.kafka.group_id
    assert meta["topic"] in settings.kafka.topics
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert meta["allowIdleConsumers"] == "false"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    partitions = int(re.search(r"has (\d+) partitions", (K8S / "keda-scaledobject.yaml").read_text())[1])  # type: ignore[index]
    assert scaled["maxReplicaCount"] <= partitions
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    example_secret = objects["Secret"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == example_secret["metadata"]["name"]
        assert ref["key"] in example_secret["stringData"]
    assert (
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
        == (objects["Deployment"]["spec"]["selector"]["matchLabels"])
    )
    assert objects["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    job_label = objects["PodMonitor"]["spec"]["jobLabel"]
    assert objects["Deployment"]["spec"]["template"]["metadata"]["labels"][job_label] == "personalize-worker"


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per stage, with line continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    stages: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_final_stage_is_slim_non_root_without_build_tools() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a final stage"
    _, builder = stages[0]
    assert any("pip wheel" in line for line in builder)
    final_from, final = stages[-1]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (DEPLOY / "Dockerfile").read_text()
    assert final_from.split()[1] in ("${PYTHON_IMAGE}", "python:3.11-slim")
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    final_text = "\n".join(final)
    for tool in ("gcc", "build-essential", "g++", "make ", "apt-get install"):
        assert tool not in final_text, f"{tool!r} in the final stage"
    assert 'ENTRYPOINT ["personalize-worker", "run"]' in final
    assert 'CMD ["--config", "/etc/personalize-worker/worker.toml"]' in final
    assert "EXPOSE 9108" in final
    installs = [line for line in final if "pip install" in line]
    assert installs and all("--no-index" in line for line in installs), "the final stage installs only the wheels"


def test_compose_wires_the_tested_pieces(tmp_path: Path) -> None:
    compose = documents(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert worker["read_only"] is True
    grace = int(worker["stop_grace_period"].removesuffix("s"))
    example = load_settings(ROOT / "config" / "worker.example.toml", environ=worker["environment"])
    assert grace > example.worker.drain_timeout_seconds
    assert example.personalize.endpoint_url.startswith("http://personalize-emulator:")
    scrape = yaml.safe_load(compose["configs"]["prometheus-config"]["content"])
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "personalize-worker"
    assert job["static_configs"][0]["targets"] == [f"worker:{example.metrics.port}"]


def test_dashboard_has_the_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "events sent",
        "events per call",
        "latency",
        "lag",
        "dead letter",
        "throttl",
        "in flight",
        "buffered",
    ):
        assert topic in titles, topic
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("histogram_quantile(0.99" in e and "put_events_latency_seconds_bucket" in e for e in exprs)


def test_no_aws_key_settings_exist() -> None:
    """AWS credentials come only from the standard chain (env, profile, IRSA, instance role)."""
    base = {"PW_PERSONALIZE__TRACKING_ID": "t"}
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        with pytest.raises(ConfigError, match=rf"personalize\.{key.lower()}: unknown key"):
            load_settings(None, environ={**base, f"PW_PERSONALIZE__{key}": "x"})
        with pytest.raises(ConfigError, match=rf"kafka\.{key.lower()}: unknown key"):
            load_settings(None, environ={**base, f"PW_KAFKA__{key}": "x"})
    for section in Settings.model_fields.values():
        model = section.annotation
        assert isinstance(model, type)
        fields = getattr(model, "model_fields", {})
        assert not [f for f in fields if re.search(r"access_key|secret_key|session_token", f)]


# --- live ---------------------------------------------------------------------------------------


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def clickstream(count: int) -> Iterator[tuple[str, bytes]]:
    now = time.time()
    for i in range(count):
        session = f"deploy-s{i % 5}"
        value = {
            "user_id": f"deploy-u{i % 7}",
            "session_id": session,
            "event_type": "click",
            "item_id": f"item-{i}",
            "timestamp": now - 30 + i * 0.01,
        }
        yield session, orjson.dumps(value)


@pytest.mark.kafka
@pytest.mark.e2e
async def test_live_metrics_pass_promtool_and_cover_every_name_the_deploy_files_use(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    await produce(worker_factory.broker.bootstrap, topic, [*clickstream(50), (None, b"not json")])
    worker = worker_factory(worker_factory.config(topic, dlq, f"{topic}-group"))

    def settled() -> bool:
        if emulator.stats()["events"] < 50:
            return False
        samples = worker.metrics()
        return samples.get("personalize_worker_records_dead_lettered_total", 0) >= 1 and any(
            k.startswith("personalize_worker_consumer_lag{") for k in samples
        )

    assert await asyncio.to_thread(wait_until, settled, 45), worker.log_tail()
    text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{worker.metrics_port}/metrics")
    ready = await asyncio.to_thread(fetch, f"http://127.0.0.1:{worker.metrics_port}/readyz")
    assert ready.strip() == "ready"
    assert (await asyncio.to_thread(fetch, f"http://127.0.0.1:{worker.metrics_port}/healthz")).strip() == "ok"

    referenced = referenced_metrics()
    assert len(referenced) >= 15, sorted(referenced)
    exposed = exposed_names(text)
    missing = missing_names(referenced, exposed)
    assert missing_names({"personalize_worker_no_such_metric": {"x"}}, exposed)  # the check can fail
    assert not missing, f"named in deploy/ but not exposed by the worker: {missing}"

    if PROMTOOL is not None:  # the name check above must not depend on promtool being installed
        result = await asyncio.to_thread(
            subprocess.run,
            [PROMTOOL, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_metrics_catches_a_broken_exposition() -> None:
    """Guards the live check above: promtool really fails on bad metric text."""
    assert PROMTOOL is not None
    bad = "# TYPE personalize_worker_x counter\npersonalize_worker_x{a=} 1\n"
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=bad, capture_output=True, text=True, check=False)
    assert result.returncode != 0
