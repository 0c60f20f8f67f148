"""The Kubernetes manifests under deploy/k8s, as rendered by ``kubectl kustomize``.

Every regional overlay is rendered once and the result is checked against the deployment
contract: the Deployment's shape, its security context, the graceful-shutdown budget, the
per-region wiring of Postgres/Qdrant/hostnames, placeholder-only secrets, and selectors
that actually select the Deployment's pods.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
REGIONS = ("us-east", "eu-west", "apac")
PRIMARY_HOST = "pg-primary.us-east.internal"
PLACEHOLDER = "REPLACE_ME"
# Where deploy/check.sh puts a kubectl when the machine has none.
FALLBACK_KUBECTL = Path(os.environ.get("TOOLS_VENV", "/tmp/mcp-rag-deploy-tools")) / "bin" / "kubectl"

Manifest = dict[str, Any]


def _kubectl() -> str:
    # deploy/check.sh fetches FALLBACK_KUBECTL only when the kubectl on PATH is missing or too old.
    for candidate in (os.environ.get("KUBECTL"), str(FALLBACK_KUBECTL), shutil.which("kubectl")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("kubectl not found: put it on PATH, set KUBECTL, or run deploy/check.sh once to fetch it")


@functools.cache
def _render(path: str) -> tuple[Manifest, ...]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", path],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)
    assert docs, f"kubectl kustomize {path} rendered nothing"
    return docs


def _one(docs: tuple[Manifest, ...], kind: str) -> Manifest:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def _container(docs: tuple[Manifest, ...]) -> Manifest:
    containers: list[Manifest] = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["api-gateway"]
    return containers[0]


def _config(docs: tuple[Manifest, ...]) -> dict[str, str]:
    """The ConfigMap the container's envFrom names (kustomize adds a hash suffix)."""
    refs = [ref["configMapRef"]["name"] for ref in _container(docs)["envFrom"] if "configMapRef" in ref]
    assert len(refs) == 1
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == refs[0]]
    data: dict[str, str] = config_map["data"]
    return data


def _secret_doc(docs: tuple[Manifest, ...]) -> Manifest:
    refs = [ref["secretRef"]["name"] for ref in _container(docs)["envFrom"] if "secretRef" in ref]
    assert len(refs) == 1
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == refs[0]]
    return secret


def _secret_values(secret: Manifest) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def _pod_labels(docs: tuple[Manifest, ...]) -> dict[str, str]:
    labels: dict[str, str] = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(params=REGIONS)
def region(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(region: str) -> tuple[Manifest, ...]:
    return _render(str(K8S / "overlays" / region))


def test_overlays_are_the_three_regions() -> None:
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(REGIONS)


def test_base_renders_the_same_objects() -> None:
    base = _render(str(K8S / "base"))
    kinds = sorted(doc["kind"] for doc in base)
    assert kinds == sorted(doc["kind"] for doc in _render(str(K8S / "overlays" / "us-east")))
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Ingress",
    } <= set(kinds)


def test_deployment(docs: tuple[Manifest, ...]) -> None:
    deployment = _one(docs, "Deployment")
    spec = deployment["spec"]
    assert deployment["metadata"]["name"] == "mcp-rag-server"
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}

    container = _container(docs)
    name, _, tag = container["image"].partition(":")
    assert name == "mcp-rag/api"
    assert tag, "the overlays pin a release tag"
    assert tag != "latest"
    assert container["imagePullPolicy"] in ("Always", "IfNotPresent")
    assert container["resources"] == {
        "requests": {"memory": "512Mi", "cpu": "500m"},
        "limits": {"memory": "1Gi", "cpu": "1000m"},
    }
    liveness = container["livenessProbe"]
    assert liveness["httpGet"] == {"path": "/health", "port": 8000}
    assert (liveness["initialDelaySeconds"], liveness["periodSeconds"]) == (30, 10)
    readiness = container["readinessProbe"]
    assert readiness["httpGet"] == {"path": "/ready", "port": 8000}
    assert (readiness["initialDelaySeconds"], readiness["periodSeconds"]) == (5, 5)
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    assert container.get("args", ["--transport", "http"]) == ["--transport", "http"]


def test_security_context(docs: tuple[Manifest, ...]) -> None:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}

    sc = _container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged", False)

    # The only writable paths are emptyDir volumes.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(docs)["volumeMounts"]}
    assert set(mounts) == {"/var/lib/mcp-rag", "/tmp"}
    for volume_name in mounts.values():
        assert "emptyDir" in volumes[volume_name]

    # No Kubernetes API access, and no service-link variables leaking into MCP_RAG_*.
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    account = _one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False)


def _prestop_seconds(pre_stop: Manifest) -> float:
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    assert "time.sleep(" in command[2]
    return float(command[2].split("time.sleep(", 1)[1].split(")", 1)[0])


def test_graceful_shutdown_fits_the_grace_period(docs: tuple[Manifest, ...]) -> None:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    grace_period = pod["terminationGracePeriodSeconds"]
    pre_stop = _prestop_seconds(_container(docs)["lifecycle"]["preStop"])
    drain = float(_config(docs)["MCP_RAG_SHUTDOWN_GRACE_SECONDS"])
    assert (grace_period, pre_stop, drain) == (30, 5, 20)
    # The kubelet counts the grace period from the start of preStop: the server must have
    # finished draining (and closed its pools) before SIGKILL, with headroom to spare.
    assert pre_stop + drain < grace_period


def test_topology_spread_over_zones(docs: tuple[Manifest, ...]) -> None:
    constraints = _one(docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    zone = [c for c in constraints if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert len(zone) == 1
    assert _selects(zone[0]["labelSelector"]["matchLabels"], _pod_labels(docs))


def test_region_settings(region: str, docs: tuple[Manifest, ...]) -> None:
    config = _config(docs)
    assert config["MCP_RAG_REGION"] == region
    assert config["MCP_RAG_STATELESS_HTTP"] == "true"
    assert config["MCP_RAG_LOG_FORMAT"] == "json"
    assert config["MCP_RAG_QDRANT_URL"] == f"http://qdrant.{region}.internal:6333"
    for key in ("MCP_RAG_DATABASE_URL", "MCP_RAG_DATABASE_READ_URL", "MCP_RAG_QDRANT_API_KEY", "MCP_RAG_API_KEYS"):
        assert key not in config, f"{key} belongs in the Secret"

    secret = _secret_values(_secret_doc(docs))
    write, read = urlsplit(secret["MCP_RAG_DATABASE_URL"]), urlsplit(secret["MCP_RAG_DATABASE_READ_URL"])
    assert write.scheme == read.scheme == "postgresql"
    # Every region writes to the one primary in us-east and reads from its own replica.
    assert (write.hostname, write.port) == (PRIMARY_HOST, 5432)
    assert (read.hostname, read.port) == (f"pg-replica.{region}.internal", 5432)
    assert write.path == read.path == "/mcp_rag"


def test_allowed_hosts_name_the_service_and_the_ingress(docs: tuple[Manifest, ...]) -> None:
    allowed = set(_config(docs)["MCP_RAG_ALLOWED_HOSTS"].split(","))
    service = _one(docs, "Service")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    for host in (name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
        assert host in allowed
        assert f"{host}:*" in allowed or f"{host}:80" in allowed
    ingress_hosts = [rule["host"] for rule in _one(docs, "Ingress")["spec"]["rules"]]
    assert ingress_hosts
    for host in ingress_hosts:
        assert host in allowed


def test_ingress(region: str, docs: tuple[Manifest, ...]) -> None:
    ingress = _one(docs, "Ingress")
    host = f"{region}.mcp-rag.example.com"
    assert [rule["host"] for rule in ingress["spec"]["rules"]] == [host]
    assert ingress["spec"]["tls"][0]["hosts"] == [host]
    service = _one(docs, "Service")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            port = backend["port"]
            assert port.get("number") == 80 or port.get("name") == "http"


def test_secret_holds_placeholders_only(docs: tuple[Manifest, ...]) -> None:
    secrets = [doc for doc in docs if doc["kind"] == "Secret"]
    assert len(secrets) == 1
    values = _secret_values(secrets[0])
    assert set(values) == {
        "MCP_RAG_DATABASE_URL",
        "MCP_RAG_DATABASE_READ_URL",
        "MCP_RAG_QDRANT_API_KEY",
        "MCP_RAG_API_KEYS",
    }
    for key in ("MCP_RAG_DATABASE_URL", "MCP_RAG_DATABASE_READ_URL"):
        assert urlsplit(values[key]).password == PLACEHOLDER, f"{key} must carry the placeholder password"
    assert values["MCP_RAG_QDRANT_API_KEY"] == PLACEHOLDER
    keys = json.loads(values["MCP_RAG_API_KEYS"])
    assert keys
    assert all(key["token"] == PLACEHOLDER for key in keys)


def test_config_keys_are_server_settings(docs: tuple[Manifest, ...]) -> None:
    """Every MCP_RAG_* key maps to a field of mcp_rag.settings.Settings and has a valid value."""
    from pydantic import ValidationError

    from mcp_rag.settings import Settings

    env = {**_config(docs), **_secret_values(_secret_doc(docs))}
    fields: dict[str, Any] = {}
    for key, value in env.items():
        assert key.startswith("MCP_RAG_"), key
        field = key.removeprefix("MCP_RAG_").lower()
        assert field in Settings.model_fields, f"{key} is not a setting of the server"
        fields[field] = value
    # The model directory exists only inside the image; the placeholder API key is checked below.
    fields.pop("embedding_model_dir")
    api_keys = fields.pop("api_keys")
    fields["_env_file"] = None  # only these values: no .env file of the working directory
    settings = Settings(**fields)
    assert settings.stateless_http is True
    assert settings.resolved_index_backend == "qdrant"
    # The placeholder token is too short to be accepted: a template applied as-is does not
    # start a server that anyone who read this repository could call.
    with pytest.raises(ValidationError) as refused:
        Settings(**fields, api_keys=api_keys)
    assert {error["loc"][0] for error in refused.value.errors()} == {"api_keys"}


def test_selectors_select_the_deployment_pods(docs: tuple[Manifest, ...]) -> None:
    deployment = _one(docs, "Deployment")
    labels = _pod_labels(docs)
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)

    service = _one(docs, "Service")
    assert _selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    target = port["targetPort"]
    container_ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    assert (container_ports[target] if isinstance(target, str) else target) == 8000
    assert service["metadata"]["name"] == "mcp-rag"

    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)

    policy = _one(docs, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)

    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    # The budget never blocks every eviction at the minimum scale.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_network_policy_ports(docs: tuple[Manifest, ...]) -> None:
    spec = _one(docs, "NetworkPolicy")["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {(p["protocol"], p["port"]) for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress_ports == {("TCP", 8000)}
    for rule in spec["ingress"]:
        assert rule["from"], "ingress must name its sources"
    egress_ports = {(p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress_ports == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 5432),
        ("TCP", 6333),
        ("TCP", 6334),
        ("TCP", 80),
        ("TCP", 443),
    }
    web = [rule for rule in spec["egress"] if {p["port"] for p in rule["ports"]} == {80, 443}]
    assert len(web) == 1, "web egress (ingest_url) is one rule"
    blocked = set(web[0]["to"][0]["ipBlock"]["except"])
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= blocked


def test_objects_share_namespace_and_region_label(region: str, docs: tuple[Manifest, ...]) -> None:
    namespace = _one(docs, "Namespace")["metadata"]["name"]
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == namespace, f"{doc['kind']}/{meta['name']}"
        assert meta["labels"]["mcp-rag.example.com/region"] == region, f"{doc['kind']}/{meta['name']}"
    assert _pod_labels(docs)["mcp-rag.example.com/region"] == region
