"""The Helm chart in helm/specsplit, rendered with Helm's own engine (helm-python-sdk).

Every value set is linted, rendered offline and each manifest validated against the Kubernetes
OpenAPI schemas shipped by kubernetes-validate (strict: unknown fields fail) for the oldest
Kubernetes the chart supports (native gRPC probes: 1.27) and a recent one. Then the content that
matters is checked: GPU counts, probes, RBAC, discovery wiring, and schema rejections.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

try:  # the wheel bundles libhelm_c and loads it on import
    import helm_python as helm
except ImportError:
    pytest.skip(
        "helm-python-sdk is not installed (pip install -e '.[dev]')", allow_module_level=True
    )
except Exception as exc:  # HelmLibraryError: no native Helm library for this platform
    pytest.skip(
        f"helm-python-sdk cannot load its native Helm library: {exc}", allow_module_level=True
    )
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
)

CHART = Path(__file__).resolve().parents[2] / "helm" / "specsplit"
RELEASE = "rel"
NAMESPACE = "llm"
KUBE_VERSIONS = ("1.27", "1.33")
GPU = "nvidia.com/gpu"

# Realistic value sets; each must lint, render and validate.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "eagle3-head": {"speculativeConfig": {"method": "eagle3", "model": "/models/heads/coder-eagle3"}},
    "ngram-no-draft-gpu": {
        "speculativeConfig": {"method": "ngram", "prompt_lookup_max": 5, "prompt_lookup_min": 2},
        "draft": {"replicas": 2, "tolerations": []},
    },
    "tp4-statefulset": {
        "target": {
            "kind": "StatefulSet",
            "replicas": 2,
            "tensorParallelSize": 4,
            "maxModelLen": 32768,
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "model": {"name": "/models/llama-3.1-70b-instruct", "existingClaim": "llm-weights"},
    },
    "autoscaling-ingress-monitoring": {
        "gateway": {
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [
                    {"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}
                ],
                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
            },
            "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    },
    "network-policy-dns": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        },
        "gateway": {"discovery": {"mode": "dns"}},
        "model": {
            "persistence": {"enabled": False},
            "volume": {"nfs": {"server": "nfs.lan", "path": "/m"}},
        },
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "mtls-cert-manager-api-keys": {
        "tls": {"enabled": True, "issuerRef": {"name": "specsplit-ca", "kind": "ClusterIssuer"}},
        "gateway": {
            "apiKeys": {
                "enabled": True,
                "existingSecret": "specsplit-api-keys",
                "maxConcurrentRequests": 4,
                "tokensPerMinute": 100000,
            }
        },
        "networkPolicy": {"enabled": True},
        "target": {"kind": "StatefulSet"},
    },
    "static-no-download": {
        "gateway": {
            "discovery": {
                "mode": "static",
                "draftAddresses": ["draft-a.example:50053"],
                "targetAddresses": ["target-a.example:50052", "target-b.example:50052"],
            }
        },
        "draft": {"enabled": False},
        "target": {"enabled": False},
        "model": {"download": {"enabled": False}, "persistence": {"enabled": False}},
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    """The chart, loaded once by Helm's own loader."""
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def render(
    chart: Any, values: dict[str, Any] | None = None, release: str = RELEASE
) -> list[dict[str, Any]]:
    """Rendered manifests (NOTES.txt left out) as dicts."""
    out = chart.render(values, name=release, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(chart: Any, values: dict[str, Any] | None = None) -> str:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def find(
    docs: list[dict[str, Any]], kind: str, component: str | None = None
) -> list[dict[str, Any]]:
    """Manifests of one kind, optionally of one component."""
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None or d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )
    ]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def port_of(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# --- lint and Kubernetes schema validation -------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_chart_lints_clean(value_set: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[value_set], strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_manifest_validates_against_kubernetes_schemas(chart: Any, value_set: str) -> None:
    docs = render(chart, VALUE_SETS[value_set])
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE or doc["kind"] == "Namespace"
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            check_service_monitor(doc, docs)  # a CRD: no schema in kubernetes-validate
            continue
        if doc["apiVersion"].startswith("cert-manager.io/"):
            check_certificate(doc, docs)  # likewise
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {path}: {exc.message}"
                )


def check_service_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """A ServiceMonitor selects exactly one Service and scrapes a port that Service has."""
    assert monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in find(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1
    names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names and endpoint["path"] == "/metrics"


def check_certificate(cert: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """A cert-manager Certificate (v1 fields only) whose Secret a workload of the chart mounts."""
    assert cert["apiVersion"] == "cert-manager.io/v1" and cert["kind"] == "Certificate"
    spec = cert["spec"]
    allowed = {"secretName", "dnsNames", "commonName", "usages", "duration", "renewBefore", "privateKey",
               "issuerRef"}
    assert set(spec) <= allowed, set(spec) - allowed
    assert spec["issuerRef"]["name"] and spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    assert spec["issuerRef"]["group"] == "cert-manager.io"
    assert set(spec["usages"]) <= {"server auth", "client auth", "digital signature", "key encipherment"}
    assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
    for field in ("duration", "renewBefore"):
        assert spec[field].endswith("h")
    mounted = {
        v["secret"]["secretName"]
        for w in workloads(docs)
        for v in w["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert spec["secretName"] in mounted


# --- GPUs, probes, storage ------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_target_requests_as_many_gpus_as_tensor_parallel_size(chart: Any, tp: int) -> None:
    docs = render(chart, {"target": {"tensorParallelSize": tp}})
    c = container(one(docs, "Deployment", "target"))
    assert c["resources"]["limits"][GPU] == tp
    assert c["resources"]["requests"][GPU] == tp
    assert f"--tensor-parallel-size={tp}" in c["args"]


def test_user_gpu_resources_cannot_disagree_with_tensor_parallel_size(chart: Any) -> None:
    values = {
        "target": {"tensorParallelSize": 4, "resources": {"limits": {GPU: 1, "memory": "1Gi"}}}
    }
    c = container(one(render(chart, values), "Deployment", "target"))
    assert c["resources"]["limits"] == {GPU: 4, "memory": "1Gi"}


def test_target_statefulset_uses_headless_service(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["tp4-statefulset"])
    assert not find(docs, "Deployment", "target")
    sts = one(docs, "StatefulSet", "target")
    svc = one(docs, "Service", "target")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert sts["spec"]["replicas"] == 2
    assert container(sts)["resources"]["limits"][GPU] == 4


def test_target_gets_memory_backed_dev_shm_for_nccl(chart: Any) -> None:
    pod = one(render(chart), "Deployment", "target")["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm"


def test_draft_model_draft_requests_one_gpu(chart: Any) -> None:
    c = container(one(render(chart), "Deployment", "draft"))
    assert c["resources"]["limits"][GPU] == 1


def test_ngram_draft_requests_no_gpu(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["ngram-no-draft-gpu"])
    c = container(one(docs, "Deployment", "draft"))
    assert GPU not in c["resources"].get("limits", {})
    assert GPU not in c["resources"].get("requests", {})
    config = json.loads(env_of(c)["SPECSPLIT_SPECULATIVE_CONFIG"])
    assert config == {
        "method": "ngram",
        "num_speculative_tokens": 5,
        "prompt_lookup_max": 5,
        "prompt_lookup_min": 2,
    }


def test_speculative_config_is_the_cli_json_for_draft_and_gateway(chart: Any) -> None:
    docs = render(chart)
    for component in ("draft", "gateway"):
        config = env_of(container(one(docs, "Deployment", component)))[
            "SPECSPLIT_SPECULATIVE_CONFIG"
        ]
        assert json.loads(config) == {
            "method": "draft_model",
            "model": "qwen2.5-coder-0.5b",
            "num_speculative_tokens": 5,
            "draft_tensor_parallel_size": 1,
        }
    # `specsplit target` has no --speculative-config flag.
    assert "SPECSPLIT_SPECULATIVE_CONFIG" not in env_of(
        container(one(docs, "Deployment", "target"))
    )


def test_eagle3_head_served_from_the_model_volume(chart: Any) -> None:
    """An EAGLE head: one GPU on the draft tier, the head's folder in the config of both the draft
    tier (which runs it on the target's embeddings) and the gateway (which reads its layers)."""
    docs = render(chart, {"speculativeConfig": {"method": "eagle3", "model": "/models/heads/coder-eagle3",
                                                "num_speculative_tokens": 4}})
    draft = container(one(docs, "Deployment", "draft"))
    assert draft["resources"]["limits"][GPU] == 1
    for component in ("draft", "gateway"):
        c = container(one(docs, "Deployment", component))
        assert json.loads(env_of(c)["SPECSPLIT_SPECULATIVE_CONFIG"]) == {
            "method": "eagle3", "model": "/models/heads/coder-eagle3", "num_speculative_tokens": 4}
        assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])  # the head is read from there


def test_an_eagle_head_named_by_hub_id_is_pulled_by_the_draft_and_gateway_pods(chart: Any) -> None:
    """As vLLM takes it: `model: org/name`. Both pods that read the head pull it into the model
    volume first (`specsplit models pull --head`), and their config names it as given."""
    head = "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"
    docs = render(chart, {"speculativeConfig": {"method": "eagle3", "model": head}})
    for component in ("draft", "gateway"):
        w = one(docs, "Deployment", component)
        pulls = [c["args"] for c in w["spec"]["template"]["spec"]["initContainers"]]
        assert ["models", "pull", "--head", head] in pulls
        assert ["models", "pull", "qwen2.5-coder-1.5b"] in pulls  # the target model still comes first
        assert json.loads(env_of(container(w))["SPECSPLIT_SPECULATIVE_CONFIG"])["model"] == head
    assert not any("--head" in c["args"] for c in one(docs, "Deployment", "target")["spec"]["template"]["spec"]
                   .get("initContainers", []))
    # an absolute head path is never pulled
    docs = render(chart, {"speculativeConfig": {"method": "eagle3", "model": "/models/heads/h"}})
    draft_pulls = [c["args"] for c in one(docs, "Deployment", "draft")["spec"]["template"]["spec"]["initContainers"]]
    assert draft_pulls == [["models", "pull", "qwen2.5-coder-1.5b"]]


def test_without_a_draft_tier_the_gateway_decodes_plainly(chart: Any) -> None:
    docs = render(chart, {"draft": {"enabled": False}})
    assert not find(docs, "Deployment", "draft") and not find(docs, "Service", "draft")
    gateway = container(one(docs, "Deployment", "gateway"))
    assert "SPECSPLIT_SPECULATIVE_CONFIG" not in env_of(gateway)
    assert not [a for a in gateway["args"] if a.startswith("--draft-")]
    assert "no draft tier: plain decoding" in notes(chart, {"draft": {"enabled": False}})


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_probes_are_native_grpc_on_the_health_port(chart: Any, value_set: str) -> None:
    for w in workloads(render(chart, VALUE_SETS[value_set])):
        c = container(w)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & c[probe].keys()
            assert handlers == {"grpc"}, (w["metadata"]["name"], probe)
            # with TLS on, the tiers answer the (plaintext-only) kubelet probes on a health port
            names = {p["name"] for p in c["ports"]}
            assert c[probe]["grpc"]["port"] == port_of(c, "health" if "health" in names else "grpc")
            assert c[probe]["grpc"].get("service", "") == ""  # overall health of grpc.health.v1


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_termination_grace_outlasts_the_drain(chart: Any, value_set: str) -> None:
    for w in workloads(render(chart, VALUE_SETS[value_set])):
        c = container(w)
        drain = next(
            int(a.split("=")[1]) for a in c["args"] if a.startswith("--shutdown-grace-seconds=")
        )
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_pods_run_non_root_with_read_only_root_filesystem(chart: Any) -> None:
    for w in workloads(render(chart)):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_model_volume_is_a_shared_claim_filled_by_init_containers(chart: Any) -> None:
    docs = render(chart)
    claim = one(docs, "PersistentVolumeClaim")
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        models = next(v for v in pod["volumes"] if v["name"] == "models")
        assert models["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        pulls = [c["args"] for c in pod["initContainers"]]
        assert ["models", "pull", "qwen2.5-coder-1.5b"] in pulls
        assert env_of(container(w))["SPECSPLIT_CACHE"] == "/models"
        mount = next(m for m in container(w)["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True
    draft_pulls = [
        c["args"][2]
        for c in one(docs, "Deployment", "draft")["spec"]["template"]["spec"]["initContainers"]
    ]
    assert draft_pulls == ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]


def test_existing_claim_and_model_path_need_no_claim_and_no_pull(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["tp4-statefulset"])
    assert not find(docs, "PersistentVolumeClaim")
    sts = one(docs, "StatefulSet", "target")
    pod = sts["spec"]["template"]["spec"]
    assert "initContainers" not in pod  # an absolute path is never pulled
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"]["claimName"] == "llm-weights"
    assert container(sts)["args"][:2] == ["target", "/models/llama-3.1-70b-instruct"]


# --- discovery, RBAC, network -----------------------------------------------------------------


def test_rbac_allows_only_reading_endpointslices(chart: Any) -> None:
    docs = render(chart)
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    role = one(docs, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = one(docs, "RoleBinding")
    account = one(docs, "ServiceAccount")
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert gateway["serviceAccountName"] == account["metadata"]["name"]
    assert gateway["automountServiceAccountToken"] is True
    for component in ("draft", "target"):
        pod = one(docs, "Deployment", component)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False


def test_gateway_watches_the_headless_services_of_both_tiers(chart: Any) -> None:
    docs = render(chart)
    args = container(one(docs, "Deployment", "gateway"))["args"]
    assert "--discovery=kubernetes" in args and f"--namespace={NAMESPACE}" in args
    for component, flag in (("draft", "--draft"), ("target", "--target")):
        svc = one(docs, "Service", component)
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is False
        grpc = next(
            p for p in svc["spec"]["ports"] if p["name"] == "grpc"
        )  # the port discovery uses
        assert f"{flag}-service={svc['metadata']['name']}" in args
        assert f"{flag}-port={grpc['port']}" in args
        tier = container(one(docs, "Deployment", component))
        assert grpc["targetPort"] == "grpc" and port_of(tier, "grpc") == grpc["port"]


def test_dns_discovery_needs_no_rbac_and_no_token(chart: Any) -> None:
    docs = render(chart, {"gateway": {"discovery": {"mode": "dns"}}})
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert gateway["automountServiceAccountToken"] is False
    assert "--discovery=dns" in gateway["containers"][0]["args"]


def test_static_discovery_passes_the_address_lists(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["static-no-download"])
    assert not workloads(
        [d for d in docs if d["metadata"]["labels"]["app.kubernetes.io/component"] != "gateway"]
    )
    args = container(one(docs, "Deployment", "gateway"))["args"]
    assert "--draft-addresses=draft-a.example:50053" in args
    assert "--target-addresses=target-a.example:50052,target-b.example:50052" in args


def test_network_policy_admits_only_the_gateway_and_the_target_to_grpc(chart: Any) -> None:
    """The target tier reaches only from the gateway; the draft tier from the gateway and, for
    direct rounds, the target tier; nothing from other namespaces."""
    docs = render(chart, VALUE_SETS["network-policy-dns"])
    labels = {c: one(docs, "Deployment", c)["spec"]["template"]["metadata"]["labels"] for c in ("gateway", "draft")}
    labels["target"] = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                            and d["metadata"]["name"].endswith("target"))["spec"]["template"]["metadata"]["labels"]
    for component, allowed in (("target", ["gateway"]), ("draft", ["gateway", "target"])):
        policy = one(docs, "NetworkPolicy", component)
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels[component].items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        grpc_rules = [
            r for r in policy["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])
        ]
        assert len(grpc_rules) == 1
        peers = grpc_rules[0]["from"]
        assert len(peers) == len(allowed)
        for peer, who in zip(peers, allowed, strict=True):
            assert peer["podSelector"]["matchLabels"].items() <= labels[who].items()
            assert "namespaceSelector" not in peer


def test_target_dials_the_draft_tier_over_mtls_for_direct_rounds(chart: Any) -> None:
    docs = render(chart, {"tls": {"enabled": True, "issuerRef": {"name": "specsplit-ca", "kind": "ClusterIssuer"}}})
    target = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"].endswith("target"))
    args = target["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--draft-tls-cert=/etc/specsplit/tls/tls.crt" in args
    assert any(a.startswith("--draft-tls-server-name=") and a.endswith(".svc") for a in args)
    cert = one(docs, "Certificate", "target")
    assert "client auth" in cert["spec"]["usages"]
    gateway = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--round=direct" in gateway


@pytest.mark.parametrize(("values", "flag"), [({}, "--max-branches=0"),
                                              ({"gateway": {"maxBranches": 2}}, "--max-branches=2")])
def test_gateway_max_branches_becomes_its_flag(chart: Any, values: dict[str, Any], flag: str) -> None:
    assert flag in container(one(render(chart, values), "Deployment", "gateway"))["args"]


@pytest.mark.parametrize(("values", "present"), [({}, False), ({"gateway": {"pipeline": True}}, False),
                                                 ({"gateway": {"pipeline": False}}, True)])
def test_gateway_pipeline_false_becomes_no_pipeline(chart: Any, values: dict[str, Any], present: bool) -> None:
    assert ("--no-pipeline" in container(one(render(chart, values), "Deployment", "gateway"))["args"]) == present


@pytest.mark.parametrize(("value", "flag"), [(None, None), (0, "--branch-alternatives=0"),
                                             (3, "--branch-alternatives=3")])
def test_draft_branch_alternatives_becomes_its_flag_only_when_set(chart: Any, value: int | None,
                                                                  flag: str | None) -> None:
    args = container(one(render(chart, {"draft": {"branchAlternatives": value}}), "Deployment", "draft"))["args"]
    got = [a for a in args if a.startswith("--branch-alternatives")]
    assert got == ([flag] if flag else [])


# --- gateway scaling and exposure -------------------------------------------------------------


def test_gateway_hpa_scales_on_cpu_and_owns_the_replica_count(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["autoscaling-ingress-monitoring"])
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")
    deployment = one(docs, "Deployment", "gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in deployment["spec"]
    assert one(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] == "50%"
    ingress = one(docs, "Ingress", "gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {
        "name": one(docs, "Service", "gateway")["metadata"]["name"],
        "port": {"name": "http"},
    }
    assert len(find(docs, "ServiceMonitor")) == 3


def test_default_install_has_no_optional_extras(chart: Any) -> None:
    docs = render(chart)
    kinds = {d["kind"] for d in docs}
    assert kinds.isdisjoint(
        {"HorizontalPodAutoscaler", "Ingress", "NetworkPolicy", "ServiceMonitor", "Certificate"}
    )
    for w in workloads(docs):  # plaintext and no API keys unless asked for
        assert not [a for a in container(w)["args"] if "tls" in a or "api-key" in a]


# --- security: mutual TLS between the tiers (cert-manager), API keys on the gateway ------------


def test_mtls_certificates_and_flags_fit_together(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["mtls-cert-manager-api-keys"])
    certs = {c["metadata"]["labels"]["app.kubernetes.io/component"]: c for c in find(docs, "Certificate")}
    assert set(certs) == {"gateway", "draft", "target"}
    assert certs["gateway"]["spec"]["usages"][0] == "client auth"
    for tier in ("draft", "target"):
        svc = one(docs, "Service", tier)["metadata"]["name"]
        spec = certs[tier]["spec"]
        assert spec["usages"][0] == "server auth"
        # the gateway checks the tier's certificate against the Service's DNS name (its default)
        assert f"{svc}.{NAMESPACE}.svc" in spec["dnsNames"]
        assert spec["issuerRef"] == {"name": "specsplit-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        w = next(w for w in workloads(docs) if w["metadata"]["labels"]["app.kubernetes.io/component"] == tier)
        c = container(w)
        pod = w["spec"]["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert vol["secret"]["secretName"] == spec["secretName"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        d = mount["mountPath"]
        assert {f"--tls-cert={d}/tls.crt", f"--tls-key={d}/tls.key", f"--tls-client-ca={d}/ca.crt",
                "--health-port=50060"} <= set(c["args"])
        assert port_of(c, "health") == 50060 == c["readinessProbe"]["grpc"]["port"]
    g = container(one(docs, "Deployment", "gateway"))
    gpod = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    vol = next(v for v in gpod["volumes"] if v["name"] == "tier-tls")
    assert vol["secret"]["secretName"] == certs["gateway"]["spec"]["secretName"]
    d = next(m for m in g["volumeMounts"] if m["name"] == "tier-tls")["mountPath"]
    assert {f"--tier-tls-ca={d}/ca.crt", f"--tier-tls-cert={d}/tls.crt", f"--tier-tls-key={d}/tls.key"} <= set(g["args"])
    # the gateway's probe stays on its gRPC port (its public ports are plaintext here)
    assert g["readinessProbe"]["grpc"]["port"] == port_of(g, "grpc")


def test_api_keys_come_from_a_mounted_secret(chart: Any) -> None:
    docs = render(chart, VALUE_SETS["mtls-cert-manager-api-keys"])
    w = one(docs, "Deployment", "gateway")
    c = container(w)
    vol = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert vol["secret"] == {"secretName": "specsplit-api-keys", "defaultMode": 0o440}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")
    assert "subPath" not in mount  # a subPath mount would never see the Secret change (revocation)
    assert f"--api-key-file={mount['mountPath']}/api-keys" in c["args"]
    assert {"--api-key-max-concurrent=4", "--api-key-tokens-per-minute=100000"} <= set(c["args"])
    assert not find(docs, "Secret")  # the chart never holds the keys itself


def test_notes_say_how_to_reach_the_gateway(chart: Any) -> None:
    text = notes(chart)
    assert f"port-forward svc/{RELEASE}-specsplit-gateway 8000:8000" in text
    assert "/v1/completions" in text
    assert "https://llm.example.com" in notes(chart, VALUE_SETS["autoscaling-ingress-monitoring"])


# --- rejection of wrong values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"target": {"tensorParallelSize": "4"}},
            "at '/target/tensorParallelSize': got string, want integer",
        ),
        ({"target": {"tensorParallelSize": 0}}, "/target/tensorParallelSize"),
        (
            {"target": {"tensorParalelSize": 4}},
            "additional properties 'tensorParalelSize' not allowed",
        ),
        ({"draft": {"replicas": 1.5}}, "/draft/replicas"),
        ({"draft": {"enabled": "yes"}}, "at '/draft/enabled': got string, want boolean"),
        (
            {"gateway": {"discovery": {"mode": "consul"}}},
            "/gateway/discovery/mode': value must be one of",
        ),
        ({"speculativeConfig": {"method": "medusa"}}, "/speculativeConfig/method"),
        (
            {"speculativeConfig": {"num_speculative_tokens": "five"}},
            "/speculativeConfig/num_speculative_tokens",
        ),
        ({"gateway": {"autoscaling": {"maxReplicas": "10"}}}, "/gateway/autoscaling/maxReplicas"),
        ({"gateway": {"readinessProbe": {"httpGet": {"path": "/"}}}}, "/gateway/readinessProbe"),
        ({"model": {"mountPath": "models"}}, "/model/mountPath"),
        ({"model": {"name": ""}}, "at '/model/name': minLength"),
        ({"target": {"gpuMemoryUtilization": 1.5}}, "/target/gpuMemoryUtilization"),
        (
            {"gateway": {"discovery": {"targetAddresses": ["no-port"]}}},
            "/gateway/discovery/targetAddresses/0",
        ),
        ({"tls": {"issuerRef": {"name": "ca", "kind": "Vault"}}}, "/tls/issuerRef/kind"),
        ({"tls": {"duration": "90 days"}}, "/tls/duration"),
        ({"gateway": {"apiKeys": {"tokensPerMinute": -1}}}, "/gateway/apiKeys/tokensPerMinute"),
        ({"gateway": {"apiKeys": {"secret": "x"}}}, "additional properties 'secret' not allowed"),
        ({"gateway": {"maxBranches": 65}}, "/gateway/maxBranches"),
        ({"gateway": {"maxBranches": -1}}, "/gateway/maxBranches"),
        ({"gateway": {"pipeline": "no"}}, "/gateway/pipeline"),
        ({"draft": {"branchAlternatives": 9}}, "/draft/branchAlternatives"),
    ],
)
def test_schema_rejects_wrong_values_with_a_clear_message(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as excinfo:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(excinfo.value)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"target": {"terminationGracePeriodSeconds": 20, "shutdownGraceSeconds": 30}},
            "target.terminationGracePeriodSeconds (20) must exceed target.shutdownGraceSeconds (30)",
        ),
        (
            {"gateway": {"discovery": {"mode": "static"}}},
            "gateway.discovery.mode=static needs gateway.discovery.targetAddresses",
        ),
        (
            {"speculativeConfig": {"model": None}},
            "speculativeConfig.model is required for method draft_model",
        ),
        (
            {"speculativeConfig": {"method": "eagle3", "model": "my-head"}},
            "speculativeConfig.model for method eagle3 must be an absolute path inside the model volume (/models/...) "
            "or a hub id (org/name)",
        ),
        ({"tls": {"enabled": True}}, "tls.enabled=true needs tls.issuerRef.name"),
        (
            {"gateway": {"apiKeys": {"enabled": True}}},
            "gateway.apiKeys.enabled=true needs gateway.apiKeys.existingSecret",
        ),
    ],
)
def test_inconsistent_values_fail_the_render_with_a_clear_message(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as excinfo:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(excinfo.value)


def test_values_yaml_documents_every_key() -> None:
    """Every key in values.yaml has a `# --` comment above it, unless it is part of the default
    value of a documented key (e.g. `resources.requests.cpu`) or of a list item."""
    nodes: list[tuple[int, bool, int | None]] = []  # (indent, documented, parent) per key line
    stack: list[int] = []
    undocumented = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for n, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and nodes[stack[-1]][0] >= indent:
            stack.pop()
        comments = []
        for prev in reversed(lines[:n]):
            if not prev.strip().startswith("#"):
                break
            comments.append(prev.strip())
        documented = stripped.startswith("-") or any(c.startswith("# --") for c in comments)
        nodes.append((indent, documented, stack[-1] if stack else None))
        stack.append(len(nodes) - 1)
        if not documented:
            undocumented.append((len(nodes) - 1, f"{n + 1}: {stripped}"))
    has_documented_child = {parent for _, documented, parent in nodes if documented}

    def in_default_value(i: int) -> bool:
        parent = nodes[i][2]
        while parent is not None:
            if nodes[parent][1] and parent not in has_documented_child:
                return True
            parent = nodes[parent][2]
        return False

    missing = [text for i, text in undocumented if not in_default_value(i)]
    assert not missing, "keys without a `# --` comment:\n" + "\n".join(missing)


def test_gpu_tier_replicas_can_be_left_to_an_hpa(chart: Any) -> None:
    docs = render(chart, {"target": {"replicas": None}, "draft": {"replicas": None}})
    assert "replicas" not in one(docs, "Deployment", "target")["spec"]
    assert "replicas" not in one(docs, "Deployment", "draft")["spec"]
    text = notes(chart, {"target": {"replicas": None}})
    assert "HPA-managed replicas (Deployment)" in text


# --- the examples in docs/kubernetes.md ----------------------------------------------------------

DOCS = CHART.parents[1] / "docs" / "kubernetes.md"
DOCS_RELEASE = "specsplit"
EXPORTED_GAUGES = {
    "specsplit_queue_depth",
    "specsplit_kv_cache_usage_ratio",
    "specsplit_active_sessions",
}


def docs_yaml_blocks() -> list[Any]:
    """Every YAML document in the ```yaml blocks of docs/kubernetes.md."""
    text = DOCS.read_text()
    blocks = []
    for chunk in text.split("```yaml")[1:]:
        body = chunk.split("```")[0]
        indent = min(len(line) - len(line.lstrip()) for line in body.splitlines() if line.strip())
        body = "\n".join(line[indent:] for line in body.splitlines())
        blocks.extend(d for d in yaml.safe_load_all(body) if d)
    return blocks


def test_docs_custom_metrics_hpas_are_valid_and_aim_at_the_chart(chart: Any) -> None:
    """The draft/target HPAs in the docs validate, scale the chart's workloads, on exported gauges."""
    docs = render(chart, {"target": {"replicas": None}}, release=DOCS_RELEASE)
    workloads_by_name = {(d["kind"], d["metadata"]["name"]) for d in workloads(docs)}
    hpas = [d for d in docs_yaml_blocks() if d.get("kind") == "HorizontalPodAutoscaler"]
    assert {h["metadata"]["name"] for h in hpas} == {"specsplit-target", "specsplit-draft"}
    for hpa in hpas:
        kubernetes_validate.validate(hpa, KUBE_VERSIONS[-1], strict=True)
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in workloads_by_name
        names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
        assert names <= EXPORTED_GAUGES


def test_docs_manifests_and_values_examples_are_valid(chart: Any) -> None:
    """Kubernetes objects in the docs validate; values examples pass the chart's schema."""
    checked = 0
    for block in docs_yaml_blocks():
        if block.get("apiVersion", "").startswith("cert-manager.io/"):
            assert block["kind"] in ("Issuer", "ClusterIssuer") and block["spec"]  # a CRD: no schema here
        elif "apiVersion" in block:
            kubernetes_validate.validate(block, KUBE_VERSIONS[-1], strict=True)
        elif "rules" in block:  # prometheus-adapter configuration
            queries = [r["seriesQuery"] for r in block["rules"]["custom"]]
            assert all(q.split("{")[0] in EXPORTED_GAUGES for q in queries)
        else:  # a values file or fragment
            chart.render(block, name=DOCS_RELEASE, namespace=NAMESPACE)
        checked += 1
    assert checked >= 6
