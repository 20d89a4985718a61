"""deploy/k8s: the Kubernetes manifests hold together, with the worker's settings and with one version.

They are parsed as files (and rendered with `kubectl kustomize` where kubectl is installed): the ConfigMap's
TOML loads as the worker loads it, the check Job sees what the worker sees, KEDA reads the worker's group,
MSK IAM needs no Secret, and the image tag is pyproject's version. tests/test_membership.py runs workers
configured from these files on the real broker.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker import __version__
from worker.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def kustomization_files(directory: Path) -> list[Path]:
    """The manifest files a kustomization includes, following directory resources (bases) recursively."""
    files: list[Path] = []
    for resource in documents(directory / "kustomization.yaml")[0]["resources"]:
        path = (directory / resource).resolve()
        files += kustomization_files(path) if path.is_dir() else [path]
    return files


def manifests(directory: Path = K8S) -> dict[str, dict[str, Any]]:
    """Every Kubernetes object a kustomization applies, by kind (one of each kind is expected), plus the
    example Secret (never applied, but what the others refer to)."""
    found: dict[str, dict[str, Any]] = {}
    for path in [*kustomization_files(directory), K8S / "secret.example.yaml"]:
        for doc in documents(path):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def configmap_settings(tmp_path: Path, toml: str | None = None) -> Settings:
    toml = toml if toml is not None else manifests()["ConfigMap"]["data"]["worker.toml"]
    path = tmp_path / "worker.toml"
    path.write_text(toml, encoding="utf-8")
    return load_settings(path, environ={"PW_KAFKA__SASL_PASSWORD": "from-the-secret"})


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- static -----------------------------------------------------------------------------------


def test_kustomization_lists_existing_files_and_not_the_example_secret() -> None:
    listed = {*kustomization_files(K8S), *kustomization_files(K8S / "check")}
    for path in listed:
        assert path.is_file(), path
    every = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    alternatives = {K8S / "secret.example.yaml", K8S / "keda-msk-iam.yaml"}
    assert every - listed == {p.resolve() for p in alternatives}


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH (its built-in kustomize renders the manifests)")
@pytest.mark.parametrize("directory", ["", "check"])
def test_kustomize_builds_and_the_check_job_gets_the_workers_image_namespace_and_config(directory: str) -> None:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / directory)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout) if doc}
    worker = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60)
    deployed = {doc["kind"]: doc for doc in yaml.safe_load_all(worker.stdout) if doc}
    assert rendered["ConfigMap"] == deployed["ConfigMap"]
    assert rendered["ServiceAccount"] == deployed["ServiceAccount"]
    pod = (rendered.get("Job") or rendered["Deployment"])["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == deployed["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert pod["containers"][0]["image"].endswith(":" + __version__)
    assert {doc["metadata"]["namespace"] for doc in rendered.values()} == {"personalize-worker"}


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
    env = container_env(container)
    # Dynamic membership: a Deployment's replacement pods get new names, and a static member that never
    # returns (aiokafka sends no LeaveGroup for one) holds the whole group for session_timeout_ms.
    assert "PW_KAFKA__GROUP_INSTANCE_ID" not in env
    assert settings.kafka.group_instance_id is None
    # MSK IAM or TLS-only clusters have no password: the pod must start without the Secret.
    assert env["PW_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
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
    configmap_settings(tmp_path)
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


def test_check_job_runs_check_with_the_workers_config_secret_account_and_security() -> None:
    """The documented "validate with the image" step must see what the worker will see, or it proves nothing."""
    worker = manifests()["Deployment"]["spec"]["template"]["spec"]
    job = manifests(K8S / "check")["Job"]
    pod = job["spec"]["template"]["spec"]
    (run,) = worker["containers"]
    (check,) = pod["containers"]
    assert check["command"] == ["personalize-worker", "check"]
    assert check["args"] == run["args"]
    assert check["image"] == run["image"]
    assert container_env(check) == container_env(run)
    assert check["volumeMounts"] == run["volumeMounts"]
    assert pod["volumes"] == worker["volumes"]
    assert pod["serviceAccountName"] == worker["serviceAccountName"]
    assert pod["securityContext"] == worker["securityContext"]
    assert check["securityContext"] == run["securityContext"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    # The worker's PDB and PodMonitor select app.kubernetes.io/name=personalize-worker: not this pod.
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] != "personalize-worker"
    images = [documents(K8S / d / "kustomization.yaml")[0]["images"] for d in ("", "check")]
    assert images[0] == images[1]


def msk_iam_toml() -> str:
    """The ConfigMap's TOML switched to MSK IAM as its comments say: the SCRAM lines out, theirs in."""
    toml = manifests()["ConfigMap"]["data"]["worker.toml"]
    commented = re.findall(r"^\s*#\s+(sasl_mechanism|aws_region)( = .*)$", toml, re.MULTILINE)
    assert len(commented) == 2, "the ConfigMap shows the MSK IAM lines"
    kept = [line for line in toml.splitlines() if not re.match(r"\s*(sasl_mechanism|sasl_username) =", line)]
    kept = [line.replace(":9096", ":9098") for line in kept]
    section = kept.index("[kafka]")
    return "\n".join([*kept[: section + 1], *(k + v for k, v in commented), *kept[section + 1 :]])


def test_msk_iam_needs_no_secret_and_keda_authenticates_with_the_workloads_role(tmp_path: Path) -> None:
    path = tmp_path / "msk.toml"
    path.write_text(msk_iam_toml(), encoding="utf-8")
    settings = load_settings(path, environ={})  # no PW_KAFKA__SASL_PASSWORD: no Secret
    assert settings.kafka.sasl_mechanism == "OAUTHBEARER"
    assert settings.kafka.sasl_password is None
    objects = {doc["kind"]: doc for doc in documents(K8S / "keda-msk-iam.yaml")}
    default = manifests()["ScaledObject"]["spec"]
    scaled = objects["ScaledObject"]["spec"]
    assert {k: v for k, v in scaled.items() if k != "triggers"} == {k: v for k, v in default.items() if k != "triggers"}
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    # KEDA >= 2.15's kafka scaler: OAUTHBEARER with the MSK IAM token provider, over TLS, in the cluster's region.
    assert (meta["sasl"], meta["saslTokenProvider"], meta["tls"]) == ("oauthbearer", "aws_msk_iam", "enable")
    assert meta["awsRegion"] == settings.kafka.aws_region
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert all(server.endswith(":9098") for server in meta["bootstrapServers"].split(","))
    assert (meta["consumerGroup"], meta["topic"]) == (settings.kafka.group_id, settings.kafka.topics[0])
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"] == {"podIdentity": {"provider": "aws", "identityOwner": "workload"}}


def test_one_version_for_package_cli_image_and_manifests() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    version = pyproject["project"]["version"]
    assert __version__ == version, "the installed package is pyproject's version (reinstall: make venv)"
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert f"ARG VERSION={version}\n" in dockerfile
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    assert "personalize_worker-${VERSION}-py3-none-any.whl" in dockerfile, "the build refuses another version"
    for directory in ("", "check"):
        (image,) = documents(K8S / directory / "kustomization.yaml")[0]["images"]
        assert image["newTag"] == version
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "--build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION)" in makefile
    result = subprocess.run(["make", "-s", "version"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == version
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
