"""k8s/: render the overlays (tests/deploy/kustomize.py, a strict kustomize subset), validate
every core object against the Kubernetes schemas offline (kubernetes-validate), and check
that probes, ports, env names, secret file paths, autoscaling and security line up with
what the worker actually reads and serves."""

from __future__ import annotations

import asyncio
import copy
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from stream_worker.cli import build_parser as stream_worker_parser
from stream_worker.observability import HealthServer, Metrics
from stream_worker.settings import Settings, load_settings
from tests.deploy.common import (
    DOCKER,
    K8S,
    command_settings,
    file_env_names,
    parse_dockerfile,
    settings_env,
)
from tests.deploy.kustomize import build

# The oldest Kubernetes release kubernetes-validate ships schemas for: manifests valid there
# are valid on every newer one it knows.
KUBERNETES_VERSION = "1.34.0"
OVERLAYS = ["cpu", "gpu", "cpu-hpa"]
Obj = dict[str, Any]
# KEDA's names (kafka scaler, `sasl`) of the worker's SASL mechanisms.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


def _render(variant: str, tmp_path: Path) -> list[Obj]:
    if variant != "cpu-hpa":
        return build(K8S / "overlays" / variant)
    # The documented alternative: the cpu overlay with components/hpa instead of components/keda.
    overlay = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    assert overlay["components"] == ["../../components/keda"]
    overlay["resources"] = [str(K8S / "base")]
    overlay["components"] = [str(K8S / "components" / "hpa")]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return build(tmp_path)


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, list[Obj]]:
    """(variant, objects) of each rendering: cpu, gpu, and cpu with the plain HPA."""
    return request.param, _render(request.param, tmp_path)


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(deployment: Obj) -> Obj:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _effective_env(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then env (literal or from Secrets)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = _one(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update({k: str(v) for k, v in config_map["data"].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = _one(objects, "Secret", ref["name"])
            env[item["name"]] = str({**secret.get("stringData", {}), **secret.get("data", {})}[ref["key"]])
    return env


def _settings(objects: list[Obj], container: Obj) -> Settings:
    return load_settings(env=_effective_env(objects, container))


def _worker(objects: list[Obj]) -> Obj:
    return _one(objects, "Deployment", "lookout-worker")


def _lookout_deployments(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] == "Deployment"]


# ------------------------------------------------------------------------------ schemas


def test_every_core_object_is_valid_kubernetes(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    core = [o for o in objects if not o["apiVersion"].startswith("keda.sh/")]
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "NetworkPolicy"} <= {
        o["kind"] for o in core
    }
    for obj in core:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_schema_validation_rejects_a_misspelt_field(tmp_path: Path) -> None:
    worker = copy.deepcopy(_worker(_render("cpu", tmp_path)))
    probe = _container(worker)["livenessProbe"]
    probe["httpGett"] = probe.pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)


def test_images_are_set_by_the_overlays(rendered: tuple[str, list[Obj]]) -> None:
    variant, objects = rendered
    worker_image = _container(_worker(objects))["image"]
    dashboard_image = _container(_one(objects, "Deployment", "lookout-dashboard"))["image"]
    for image in (worker_image, dashboard_image):
        assert "/" in image and ":" in image, f"placeholder image {image!r} left in the render"
    assert ("lookout-gpu" in worker_image) == (variant == "gpu")
    assert "lookout-gpu" not in dashboard_image, "the dashboard needs no GPU"


# ------------------------------------------------------------------- settings and secrets


def test_every_env_name_is_a_setting_and_every_value_parses(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    known = set(settings_env())
    for deployment in _lookout_deployments(objects):
        env = _effective_env(objects, _container(deployment))
        unknown = set(env) - known
        assert not unknown, f"{deployment['metadata']['name']} sets variables lookout ignores: {unknown}"
        load_settings(env=env)  # raises ConfigError on a value the worker would refuse


def test_container_args_are_valid_stream_worker_commands(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    parser = stream_worker_parser()
    for deployment in _lookout_deployments(objects):
        args = _container(deployment)["args"]
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{deployment['metadata']['name']}: `stream-worker {' '.join(args)}` does not parse")
    assert _container(_worker(objects))["args"] == ["run"]


def _secret_files(objects: list[Obj], deployment: Obj) -> dict[str, str]:
    """Every file the Deployment's Secret volumes put in the container, with its content."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files: dict[str, str] = {}
    for mount in _container(deployment).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" not in volume:
            continue
        secret = _one(objects, "Secret", volume["secret"]["secretName"])
        data = {**secret.get("stringData", {}), **secret.get("data", {})}
        items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = data[item["key"]]
    return files


def test_secret_file_settings_name_files_the_secrets_provide(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for deployment in _lookout_deployments(objects):
        name = deployment["metadata"]["name"]
        env = _effective_env(objects, _container(deployment))
        files = _secret_files(objects, deployment)
        for var in sorted(file_env_names() & set(env)):
            if env[var]:
                assert env[var] in files, f"{name}: {var}={env[var]} is not a file of a mounted Secret"
        settings = load_settings(env=env)
        # What the worker needs to connect, given the protocols the ConfigMap chose.
        if "SASL" in settings.kafka.security_protocol:
            assert settings.kafka.sasl_username and settings.kafka.sasl_password_file in files
        if "SSL" in settings.kafka.security_protocol:
            assert settings.kafka.ssl_cafile in files
        if settings.redis.redis_url.startswith("rediss://"):
            assert settings.redis.redis_ca_file in files
        assert settings.redis.redis_password_file in files and settings.redis.redis_username
        if _container(deployment)["args"][0] == "dashboard":
            token_file = command_settings(_container(deployment)["args"], env).dashboard.token_file
            assert token_file in files, f"{name}: token file {token_file} is not a mounted Secret file"


def test_nothing_secret_sits_in_the_configmap(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    config = _one(objects, "ConfigMap", "lookout-config")["data"]
    secret_envs = {env for env, f in settings_env().items() if f.metadata["secret"]}
    assert not secret_envs & set(config)
    for key, value in config.items():
        assert "@" not in str(value) or "://" not in str(value), f"{key} holds credentials in a URL"


# --------------------------------------------------------------- probes, ports, lifecycle


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[list[bool], int]]:
    """The worker's real health server; ``state[0]`` is readiness (liveness stays true)."""
    state = [False]
    server = HealthServer(Metrics(), ready=lambda: (state[0], "engine"), live=lambda: (True, "alive"))
    port = await server.start("127.0.0.1", 0)
    try:
        yield state, port
    finally:
        await server.stop()


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except HTTPError as exc:
        return exc.code


async def test_worker_probes_hit_the_worker_health_server(
    health_server: tuple[list[bool], int], tmp_path: Path
) -> None:
    state, port = health_server
    for variant in OVERLAYS:
        (tmp_path / variant).mkdir()
        worker = _worker(_render(variant, tmp_path / variant))
        container = _container(worker)
        probes = {
            k: container[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert probes == {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        state[0] = False
        codes = {k: await asyncio.to_thread(_status, port, p) for k, p in probes.items()}
        assert codes == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 503}
        state[0] = True
        assert await asyncio.to_thread(_status, port, probes["readinessProbe"]) == 200
        metrics_path = worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        assert await asyncio.to_thread(_status, port, metrics_path) == 200


def test_probe_service_and_policy_ports_are_the_metrics_port(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    worker = _worker(objects)
    container = _container(worker)
    metrics_port = _settings(objects, container).ops.metrics_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == metrics_port
    service = _one(objects, "Service", "lookout-worker-metrics")
    (service_port,) = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == metrics_port
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    policy = _one(objects, "NetworkPolicy", "lookout-worker")
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [metrics_port]


def test_dashboard_probes_and_service_use_its_listening_port(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    dashboard = _one(objects, "Deployment", "lookout-dashboard")
    container = _container(dashboard)
    settings = command_settings(container["args"], _effective_env(objects, container)).dashboard
    assert settings.host == "0.0.0.0", "reachable by the Service (and so it requires its token)"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == settings.port
        assert container[probe]["httpGet"]["path"] == "/healthz", "the one route without a token"
    (service_port,) = _one(objects, "Service", "lookout-dashboard")["spec"]["ports"]
    assert ports[service_port["targetPort"]] == settings.port


def test_termination_grace_outlasts_the_drain_deadline(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    worker = _worker(objects)
    drain_s = _settings(objects, _container(worker)).ops.drain_deadline_s
    grace_s = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Past the drain: the final commit and leaving the group, before the kubelet's SIGKILL.
    assert grace_s >= drain_s + 10


# ------------------------------------------------------------------- security and storage


def test_pods_run_as_the_image_user_with_a_read_only_root(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    (user,) = [i.args for i in parse_dockerfile(DOCKER / "Dockerfile") if i.keyword == "USER"]
    (gpu_user,) = [i.args for i in parse_dockerfile(DOCKER / "Dockerfile.gpu") if i.keyword == "USER"]
    assert user == gpu_user
    uid, _, gid = user.partition(":")
    for deployment in _lookout_deployments(objects):
        pod = deployment["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
        assert pod["automountServiceAccountToken"] is False
        container_security = _container(deployment)["securityContext"]
        assert container_security["readOnlyRootFilesystem"] is True
        assert container_security["allowPrivilegeEscalation"] is False
        assert container_security["capabilities"]["drop"] == ["ALL"]


def test_worker_writes_only_to_mounted_volumes(rendered: tuple[str, list[Obj]]) -> None:
    variant, objects = rendered
    worker = _worker(objects)
    pod = worker["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        m["mountPath"]: volumes[m["name"]]
        for m in _container(worker)["volumeMounts"]
        if not m.get("readOnly")
        and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])
    }
    cache_dir = _settings(objects, _container(worker)).engine.cache_dir
    assert cache_dir in writable and "/tmp" in writable
    if variant == "gpu":
        claim = writable[cache_dir]["persistentVolumeClaim"]["claimName"]
        pvc = _one(objects, "PersistentVolumeClaim", claim)
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every GPU pod shares the engine cache"
        dockerfile = (DOCKER / "Dockerfile.gpu").read_text()
        assert f"LOOKOUT_CACHE_DIR={cache_dir}" in dockerfile


# ------------------------------------------------------------------------- network policy


def _port_of(address: str, default: int) -> int:
    return urlsplit(address if "://" in address else f"//{address}").port or default


def test_network_policies_allow_egress_to_kafka_redis_and_dns_only(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for deployment in _lookout_deployments(objects):
        settings = _settings(objects, _container(deployment))
        kafka_ports = {_port_of(b, 9092) for b in settings.kafka.bootstrap.split(",")}
        redis_port = _port_of(settings.redis.redis_url, 6379)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        policies = [
            p
            for p in objects
            if p["kind"] == "NetworkPolicy"
            and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(policies) == 1, f"{deployment['metadata']['name']}: expected exactly one NetworkPolicy"
        spec = policies[0]["spec"]
        assert "Egress" in spec["policyTypes"] and "Ingress" in spec["policyTypes"]
        allowed = {(p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"]}
        assert allowed == {("TCP", port) for port in kafka_ports} | {
            ("TCP", redis_port),
            ("UDP", 53),
            ("TCP", 53),
        }
        assert all(rule.get("to") for rule in spec["egress"]), "every egress rule names its peers"


def test_pdb_and_services_select_their_pods(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for kind, name, target in [
        ("PodDisruptionBudget", "lookout-worker", "lookout-worker"),
        ("Service", "lookout-worker-metrics", "lookout-worker"),
        ("Service", "lookout-dashboard", "lookout-dashboard"),
    ]:
        obj = _one(objects, kind, name)
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        labels = _one(objects, "Deployment", target)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{kind}/{name} selects no {target} pod"
        others = [d for d in _lookout_deployments(objects) if d["metadata"]["name"] != target]
        for other in others:
            assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    assert _one(objects, "PodDisruptionBudget", "lookout-worker")["spec"]["maxUnavailable"] == 1


# ---------------------------------------------------------------------------- autoscaling


def _autoscalers(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]


def test_exactly_one_autoscaler_capped_at_the_partition_count(rendered: tuple[str, list[Obj]]) -> None:
    variant, objects = rendered
    (scaler,) = _autoscalers(objects)
    assert scaler["kind"] == ("HorizontalPodAutoscaler" if variant == "cpu-hpa" else "ScaledObject")
    worker = _worker(objects)
    partitions = int(worker["metadata"]["annotations"]["lookout.io/frames-topic-partitions"])
    spec = scaler["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    maximum = spec.get("maxReplicaCount", spec.get("maxReplicas"))
    minimum = spec.get("minReplicaCount", spec.get("minReplicas"))
    assert maximum == partitions, "more workers than partitions would sit idle"
    assert 1 <= minimum <= maximum
    behavior = spec.get("behavior") or spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60, "each scale-down is a rebalance"


def test_keda_trigger_watches_the_workers_group_topic_and_brokers(rendered: tuple[str, list[Obj]]) -> None:
    variant, objects = rendered
    if variant == "cpu-hpa":
        hpa = _one(objects, "HorizontalPodAutoscaler", "lookout-worker")
        settings = _settings(objects, _container(_worker(objects)))
        (metric,) = hpa["spec"]["metrics"]
        labels = metric["external"]["metric"]["selector"]["matchLabels"]
        assert labels == {"consumergroup": settings.topics.group, "topic": settings.topics.frames_topic[0]}
        assert int(metric["external"]["target"]["averageValue"]) > 0
        return
    scaled = _one(objects, "ScaledObject", "lookout-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    settings = _settings(objects, _container(_worker(objects)))
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["bootstrapServers"] == settings.kafka.bootstrap
    assert meta["consumerGroup"] == settings.topics.group
    assert [meta["topic"]] == settings.topics.frames_topic
    assert int(meta["lagThreshold"]) > 0
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert meta["sasl"] == KEDA_SASL[settings.kafka.sasl_mechanism]
    assert (meta["tls"] == "enable") == ("SSL" in settings.kafka.security_protocol)
    auth = _one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    for ref in auth["spec"]["secretTargetRef"]:
        secret = _one(objects, "Secret", ref["name"])
        assert ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password", "ca"}


# ------------------------------------------------------------------------------------ GPU


def test_gpu_overlay_gives_each_worker_one_gpu_and_time_to_build_its_engine(tmp_path: Path) -> None:
    objects = _render("gpu", tmp_path)
    container = _container(_worker(objects))
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    tolerations = _worker(objects)["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    settings = _settings(objects, container)
    assert settings.engine.engine == "", "the GPU entrypoint picks the engine for the GPU it finds"
    for deployment in _lookout_deployments(_render("cpu", tmp_path)):
        assert "nvidia.com/gpu" not in str(deployment)


# ----------------------------------------------------------------------------- monitoring


def test_monitoring_component_scrapes_the_workers_under_the_job_the_alerts_name(tmp_path: Path) -> None:
    # The documented opt-in: the cpu overlay with components/monitoring added (it needs the
    # Prometheus Operator's CRDs, so no overlay includes it by default).
    overlay = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    overlay["resources"] = [str(K8S / "base")]
    overlay["components"] = [str(K8S / "components" / c) for c in ("keda", "monitoring")]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    objects = build(tmp_path)
    monitor = _one(objects, "ServiceMonitor", "lookout-worker")
    rule = _one(objects, "PrometheusRule", "lookout-worker")
    assert monitor["apiVersion"] == rule["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        o for o in objects if o["kind"] == "Service" and selector.items() <= o["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == ["lookout-worker-metrics"], "one Service, once"
    (service,) = services
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The operator's job label is the Service's name; `up` alerts must select that job.
    up_jobs = {
        job
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        for job in re.findall(r'\bup\{job="([^"]+)"\}', r["expr"])
    }
    assert up_jobs == {service["metadata"]["name"]}
    core = [o for o in objects if not o["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/"))]
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
