"""deploy/: every manifest validates against the Kubernetes API schemas, and says what we claim."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
VERSIONS = ["1.33", "1.37"]  # native sidecars (restartPolicy: Always on init containers) are GA


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path: Path, version: str) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_catches_mistakes() -> None:
    pod = documents(DEPLOY / "kubernetes" / "runner-pod.yaml")[0]
    broken = copy.deepcopy(pod)
    broken["spec"]["initContainers"][0]["volumeMount"] = []  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33", strict=True)


def pod_specs() -> list[dict[str, Any]]:
    specs = []
    for path in MANIFESTS:
        for document in documents(path):
            if document["kind"] == "Pod":
                specs.append(document["spec"])
            elif document["kind"] == "Job":
                specs.append(document["spec"]["template"]["spec"])
    return specs


@pytest.mark.parametrize("spec", pod_specs(), ids=["pod", "job"])
def test_pod_wiring(spec: dict[str, Any]) -> None:
    broker = next(c for c in spec["initContainers"] if c["name"] == "stigmer-broker")
    runner = spec["containers"][0]
    assert broker["restartPolicy"] == "Always"  # a native sidecar
    assert broker["args"][0] == "sidecar"
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert broker["startupProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["stigmer-run"]["emptyDir"]["medium"] == "Memory"
    assert volumes["stigmer-run"]["emptyDir"]["sizeLimit"]
    token = volumes["vault-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "vault"
    assert spec["automountServiceAccountToken"] is False
    for container in (broker, runner):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["allowPrivilegeEscalation"] is False
    assert broker["securityContext"]["runAsUser"] != runner["securityContext"]["runAsUser"]
    assert broker["securityContext"]["runAsGroup"] == runner["securityContext"]["runAsGroup"]
    assert f"--allow-uid={runner['securityContext']['runAsUser']}" in broker["args"]


def test_job_completes_on_its_own() -> None:
    job = documents(DEPLOY / "kubernetes" / "job.yaml")[0]
    template = job["spec"]["template"]["spec"]
    assert template["restartPolicy"] == "Never"
    assert "broker.execution(" in template["containers"][0]["args"][0]


def test_dockerfile_runs_as_non_root() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    user = [line for line in lines if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["stigmer-broker"]' in lines


def test_the_reaper_runs_with_its_own_identity() -> None:
    account, deployment = documents(DEPLOY / "kubernetes" / "reaper.yaml")
    assert account["metadata"] == {"name": "stigmer-reaper", "namespace": "stigmer-system"}
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "stigmer-reaper"
    container = spec["containers"][0]
    assert container["args"][0] == "reaper" and "--all-tenants" in container["args"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["runAsUser"] != 0
    token = spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "vault"
