"""deploy/: the container, alert rules, dashboard and compose file hold together (the Kubernetes manifests:
tests/test_manifests.py).

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
from typing import get_args, get_origin

import orjson
import pytest
import yaml

from tests.kafka_support import TopicFactory, produce
from tests.stack import EmulatorProcess, WorkerFactory, wait_until
from tests.test_manifests import documents
from worker.config import Settings, load_settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "personalize-worker.json"
METRIC_NAME = re.compile(r"\b(?:personalize_worker|process|python)_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian package 'prometheus'; `make test` installs it as root)"
)


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names in alerts, dashboard and manifests → the files that mention them."""
    sources = [ALERTS, DASHBOARD, *sorted(K8S.rglob("*.yaml")), DEPLOY / "docker-compose.yml"]
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
        "PersonalizeWorkerPutEventsRefused",
        "PersonalizeWorkerEventsRetriesExhausted",
        "PersonalizeWorkerSourceTopicMissing",
        "PersonalizeWorkerRouteThrottled",
    } <= alerts


@needs_promtool
def test_request_level_and_retries_exhausted_alerts_fire(tmp_path: Path) -> None:
    """promtool's rule unit test: the two alerts of the retry policy fire on the series the worker exports."""
    assert PROMTOOL is not None
    rules = {rule["alert"]: rule for group in documents(ALERTS)[0]["groups"] for rule in group["rules"]}
    instance = {"job": "personalize-worker", "instance": "w:9108"}
    refused = rules["PersonalizeWorkerPutEventsRefused"]
    exhausted = rules["PersonalizeWorkerEventsRetriesExhausted"]
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'personalize_worker_put_events_refused{job="personalize-worker",instance="w:9108"}',
                        "values": "0 1 1 1 1 1 0 0",
                    },
                    {
                        "series": 'personalize_worker_records_invalid_total{job="personalize-worker",'
                        'instance="w:9108",reason="retries_exhausted"}',
                        "values": "0 0 1 1 1 1 1 1",
                    },
                    {
                        "series": 'personalize_worker_records_invalid_total{job="personalize-worker",'
                        'instance="w:9108",reason="rejected"}',
                        "values": "0 5 10 15 20 25 30 35",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "PersonalizeWorkerPutEventsRefused", "exp_alerts": []},
                    {
                        "eval_time": "4m",
                        "alertname": "PersonalizeWorkerPutEventsRefused",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "instance": instance["instance"]},
                                "exp_annotations": {
                                    "summary": refused["annotations"]["summary"].replace(
                                        "{{ $labels.instance }}", instance["instance"]
                                    ),
                                    "description": refused["annotations"]["description"],
                                },
                            }
                        ],
                    },
                    {"eval_time": "7m", "alertname": "PersonalizeWorkerPutEventsRefused", "exp_alerts": []},
                    {
                        "eval_time": "4m",
                        "alertname": "PersonalizeWorkerEventsRetriesExhausted",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "job": instance["job"]},
                                "exp_annotations": {
                                    "summary": exhausted["annotations"]["summary"].replace(
                                        "{{ $value | humanize }}", "1"
                                    ),
                                    "description": exhausted["annotations"]["description"],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "retry-alerts.test.yml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_route_throttled_alert_fires_for_the_throttled_route_only(tmp_path: Path) -> None:
    """promtool's rule unit test: one route throttled on half its calls alerts, naming it; its neighbour does not."""
    assert PROMTOOL is not None
    where = 'job="personalize-worker",instance="w:9108"'
    series = [
        (f'personalize_worker_route_calls_total{{{where},route="catalog",outcome="throttled"}}', "0+30x30"),
        (f'personalize_worker_route_calls_total{{{where},route="catalog",outcome="ok"}}', "0+30x30"),
        (f'personalize_worker_route_calls_total{{{where},route="clicks",outcome="ok"}}', "0+600x30"),
        (f'personalize_worker_route_calls_total{{{where},route="clicks",outcome="throttled"}}', "0+0x30"),
    ]
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "PersonalizeWorkerRouteThrottled", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "PersonalizeWorkerRouteThrottled",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "job": "personalize-worker", "route": "catalog"},
                                "exp_annotations": {
                                    "summary": "Route catalog throttled on 50% of its calls for 15 minutes",
                                    "description": rule_annotation("PersonalizeWorkerRouteThrottled", "description"),
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "route-alerts.test.yml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def rule_annotation(alert: str, key: str) -> str:
    rules = {rule["alert"]: rule for group in documents(ALERTS)[0]["groups"] for rule in group["rules"]}
    text: str = rules[alert]["annotations"][key]
    return text


@needs_promtool
def test_sample_prometheus_config_passes_promtool() -> None:
    assert PROMTOOL is not None
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in documents(config)[0]["scrape_configs"]}
    assert "personalize-worker" in jobs  # the alerts select job="personalize-worker"


MEMORY_ALERT_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'process_resident_memory_bytes{{job="personalize-worker",instance="near"}}'
        values: '900000000x15'
      - series: 'personalize_worker_memory_limit_bytes{{job="personalize-worker",instance="near"}}'
        values: '1000000000x15'
      - series: 'process_resident_memory_bytes{{job="personalize-worker",instance="fine"}}'
        values: '300000000x15'
      - series: 'personalize_worker_memory_limit_bytes{{job="personalize-worker",instance="fine"}}'
        values: '1000000000x15'
      - series: 'process_resident_memory_bytes{{job="personalize-worker",instance="unlimited"}}'
        values: '900000000x15'
      - series: 'personalize_worker_memory_limit_bytes{{job="personalize-worker",instance="unlimited"}}'
        values: '0x15'
    alert_rule_test:
      - eval_time: 3m
        alertname: PersonalizeWorkerMemoryNearLimit
        exp_alerts: []
      - eval_time: 10m
        alertname: PersonalizeWorkerMemoryNearLimit
        exp_alerts:
          - exp_labels: {{severity: warning, job: personalize-worker, instance: near}}
            exp_annotations:
              summary: "near uses 90% of its memory limit"
              description: "{description}"
"""


@needs_promtool
def test_memory_alert_fires_near_the_limit_only(tmp_path: Path) -> None:
    """promtool runs the rule on series: 90% of the limit fires after 5 m; 30%, or no limit (0), never."""
    assert PROMTOOL is not None
    rules = {r["alert"]: r for g in documents(ALERTS)[0]["groups"] for r in g["rules"] if "alert" in r}
    description = rules["PersonalizeWorkerMemoryNearLimit"]["annotations"]["description"]
    path = tmp_path / "memory_test.yml"
    path.write_text(MEMORY_ALERT_TESTS.format(alerts=json.dumps(str(ALERTS)), description=description))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cgroup_memory_limit_reads_v1_and_v2_and_takes_the_tightest(tmp_path: Path) -> None:
    from worker.observe.metrics import cgroup_memory_limit

    def write(relative: str, text: str) -> None:
        path = tmp_path / "cg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/pod1/worker\n")
    write("kubepods/pod1/worker/memory.max", "max\n")
    write("kubepods/pod1/memory.max", "1073741824\n")  # the pod's limit sits on the parent
    write("kubepods/memory.max", "8589934592\n")
    assert cgroup_memory_limit(tmp_path / "cg", membership) == 1073741824
    membership.write_text("4:memory:/docker/abc\n0::/\n")  # v1, mounted as the container's own root
    write("memory/memory.limit_in_bytes", "536870912\n")
    assert cgroup_memory_limit(tmp_path / "cg", membership) == 536870912
    write("memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path / "cg", membership) == 0
    assert cgroup_memory_limit(tmp_path / "cg", tmp_path / "missing") == 0


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
    # Per route: records by final state (superseded and deleted among them), calls by outcome, rate per destination.
    for title, metric_name, by in (
        ("route records by state", "personalize_worker_route_records_total", "(route, state)"),
        ("route calls by outcome", "personalize_worker_route_calls_total", "(route, outcome)"),
        (
            "route rate limit per destination",
            "personalize_worker_route_rate_limit_requests_per_second",
            "(route, destination)",
        ),
    ):
        (panel,) = [p for p in dashboard["panels"] if p["title"].lower().startswith(title)]
        assert any(metric_name in t["expr"] and by in t["expr"] and "$route" in t["expr"] for t in panel["targets"]), (
            title
        )
    assert "superseded" in titles and "route" in {v["name"] for v in dashboard["templating"]["list"]}


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
        if get_origin(model) is tuple:  # [[routes]]: an array of one model's tables
            model = get_args(model)[0]
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
    # The standard process and runtime metrics, beside the worker's own.
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= exposed
    assert {"python_gc_collections_total", "python_gc_objects_collected_total", "python_info"} <= exposed
    assert "personalize_worker_memory_limit_bytes" in exposed
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
