"""The container files, checked without a Docker engine: hadolint and shellcheck, the compose
file against the Compose specification's JSON schema, and every name, path, port and command
in them against what lookout actually reads, serves and parses."""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from engine_build.cli import build_parser as engine_build_parser
from stream_worker.cli import build_parser as stream_worker_parser
from stream_worker.observability import HealthServer, Metrics
from stream_worker.settings import load_settings
from tests.deploy.common import (
    DOCKER,
    ENV_REFERENCE,
    REPO,
    Instruction,
    command_settings,
    env_assignments,
    parse_dockerfile,
    settings_default,
    settings_env,
)

DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
GPU_ENTRYPOINT = DOCKER / "entrypoint-gpu.sh"
COMPOSE = DOCKER / "compose.yaml"
# Variables of the GPU entrypoint itself (documented in docker/entrypoint-gpu.sh), not settings.
ENTRYPOINT_ONLY_ENV = {"LOOKOUT_TRT_PRECISION"}
# Environment of the base images and of pip, not lookout's.
IMAGE_ENV_PREFIXES = ("PYTHON", "PIP_")


def _tool(name: str) -> str:
    """A dev tool installed next to this Python (the dev extra), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'", pytrace=False)
    return found


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _lookout_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the lookout image (built from docker/Dockerfile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if (service.get("build") or {}).get("dockerfile") == "docker/Dockerfile"
    }


def _seconds(duration: str) -> float:
    """A Compose duration such as ``30s``, ``1m30s`` or ``500ms`` in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------------- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_gpu_entrypoint_passes_shellcheck() -> None:
    result = subprocess.run(
        [_tool("shellcheck"), "--severity=style", str(GPU_ENTRYPOINT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(GPU_ENTRYPOINT, os.X_OK), "the GPU entrypoint must be executable"


def test_compose_file_follows_the_compose_specification() -> None:
    # The Compose specification's schema (compose-spec/compose-spec, Apache-2.0) as vendored
    # by check-jsonschema, which keeps it current; no copy of it lives in this repository.
    # Located, not imported: the schema is data, and the package's CLI pins click versions.
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("check-jsonschema is not installed: pip install -e '.[dev]'", pytrace=False)
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    schema_path = package_dir / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    misspelt = _compose()
    misspelt["services"]["worker"]["enviroment"] = misspelt["services"]["worker"].pop("environment")
    assert not validator.is_valid(misspelt), "the schema must reject unknown service keys"


# ------------------------------------------------------------------------------ Dockerfiles


def _copy_sources(instructions: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword != "COPY":
            continue
        words = ins.args.split()
        if any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[:-1] if not w.startswith("--"))
    return sources


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatch(c, glob) or fnmatch.fnmatch(c.split("/")[-1], glob) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_and_reaches_the_build_context(dockerfile: Path) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = _copy_sources(parse_dockerfile(dockerfile))
    assert "models/efficientnet_lite0.onnx" in sources, "the image needs the model"
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert not _dockerignore_excludes(source, patterns), f".dockerignore keeps {source} out"
    assert _dockerignore_excludes(".venv", patterns) and _dockerignore_excludes(".git", patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_non_root_and_exec_form(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users, "the image must switch to an unprivileged user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric, non-root uid (runAsNonRoot can verify it)"
    assert gid.isdigit() and int(gid) > 0
    for keyword in ("ENTRYPOINT", "CMD"):
        last = [ins for ins in instructions if ins.keyword == keyword][-1]
        assert last.exec_form(), f"{keyword} must be exec form, so SIGTERM reaches the worker"
    exposed = [ins.args for ins in instructions if ins.keyword == "EXPOSE"]
    assert exposed == [str(settings_default("LOOKOUT_METRICS_PORT"))]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_env_names_are_settings(dockerfile: Path) -> None:
    names = set(env_assignments(parse_dockerfile(dockerfile)))
    unknown = {n for n in names if not n.startswith(IMAGE_ENV_PREFIXES)} - set(settings_env())
    assert not unknown, f"{dockerfile.name} sets variables lookout does not read: {sorted(unknown)}"


def test_cpu_image_bakes_the_engine_it_points_lookout_engine_at() -> None:
    instructions = parse_dockerfile(DOCKER / "Dockerfile")
    env = env_assignments(instructions)
    engine = env["LOOKOUT_ENGINE"]
    builds = [ins.args for ins in instructions if ins.keyword == "RUN" and "engine-build build" in ins.args]
    assert len(builds) == 1
    command = builds[0].split("&&")[0].replace("${LOOKOUT_ENGINE}", engine)
    words = command.replace('"', "").split()
    args = engine_build_parser().parse_args(words[1:])
    assert (args.command, args.backend, args.precision) == ("build", "onnxruntime", "fp32")
    assert str(args.out) == engine
    # Not inside the cache directory: on Kubernetes an emptyDir is mounted over it.
    assert not engine.startswith(env["LOOKOUT_CACHE_DIR"] + "/")


async def _health_server(live: list[bool]) -> tuple[HealthServer, int]:
    server = HealthServer(Metrics(), ready=lambda: (True, "ready"), live=lambda: (live[0], "pipeline"))
    return server, await server.start("127.0.0.1", 0)


@pytest.fixture
async def health() -> AsyncIterator[tuple[list[bool], int]]:
    """The worker's real /healthz server on a free port; flip ``live[0]`` to fail it."""
    live = [True]
    server, port = await _health_server(live)
    try:
        yield live, port
    finally:
        await server.stop()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
async def test_healthcheck_passes_on_a_live_worker_and_fails_otherwise(
    dockerfile: Path, health: tuple[list[bool], int]
) -> None:
    live, port = health
    checks = [ins for ins in parse_dockerfile(dockerfile) if ins.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    command = checks[0].exec_form()
    assert command is not None and command[0] in ("python", "python3") and command[1] == "-c"
    assert "/healthz" in command[2]

    async def run_check() -> int:
        env = {**os.environ, "LOOKOUT_METRICS_PORT": str(port)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *command[1:], env=env, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(proc.wait(), timeout=30)

    assert await run_check() == 0
    live[0] = False
    assert await run_check() != 0


def test_wheel_of_the_image_ships_the_model_and_every_package_file(tmp_path: Path) -> None:
    """docker/Dockerfile builds a wheel with the model copied into stream_worker/data; the
    installed worker must find the model there, have every data file it reads, and find the
    default engine's provider."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("stream_worker", "engine_build"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    shutil.copy(REPO / "models" / "efficientnet_lite0.onnx", src / "stream_worker" / "data")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--wheel-dir", str(tmp_path / "wheels"), str(src)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("lookout-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        archive.extractall(site)
        (entry_points,) = (name for name in shipped if name.endswith(".dist-info/entry_points.txt"))
        # Serving finds the default engine through this entry point (stream_worker.backends.registry).
        assert "[lookout.engines]\ndefault = engine_build.default:ensure_default_engine" in (
            archive.read(entry_points).decode()
        )
    expected = {
        p.relative_to(src).as_posix()
        for package in ("stream_worker", "engine_build")
        for p in (src / package).rglob("*")
        if p.is_file()
    }
    missing = sorted(expected - shipped)
    assert not missing, f"the wheel (and so the image) lacks {missing}: add them to package-data"
    found = subprocess.run(
        [sys.executable, "-c", "from engine_build.default import default_onnx_path as p; print(p())"],
        env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found) == site / "stream_worker" / "data" / "efficientnet_lite0.onnx"


# ---------------------------------------------------------------------------- GPU entrypoint


def test_gpu_entrypoint_reads_only_settings_and_its_own_variables() -> None:
    names = set(ENV_REFERENCE.findall(GPU_ENTRYPOINT.read_text()))
    lookout = {n for n in names if n.startswith(("LOOKOUT_", "KAFKA_", "REDIS_"))}
    unknown = lookout - set(settings_env()) - ENTRYPOINT_ONLY_ENV
    assert not unknown, f"entrypoint-gpu.sh reads unknown variables {sorted(unknown)}"
    assert "LOOKOUT_ENGINE" in lookout and "LOOKOUT_MAX_BATCH" in lookout


def test_gpu_entrypoint_imports_only_what_exists() -> None:
    # Its checks run with stderr silenced: an import of a name that moved would read as "no
    # valid engine" and rebuild the engine at every start.
    imports = re.findall(r"^from (\S+) import (\w+)$", GPU_ENTRYPOINT.read_text(), re.M)
    assert imports, "the entrypoint's Python one-liners import lookout's functions"
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"entrypoint-gpu.sh imports {module}.{name}"


def test_gpu_image_keeps_its_own_tensorrt() -> None:
    # The gpu extra would install a second TensorRT from PyPI (tensorrt-cu12) next to the image's.
    runs = [i.args for i in parse_dockerfile(DOCKER / "Dockerfile.gpu") if i.keyword == "RUN"]
    (install,) = (r for r in runs if "pip install" in r)
    assert '".[gpu-bindings]"' in install and '".[gpu]"' not in install
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras["gpu-bindings"]] == ["cuda-python"]


def test_gpu_entrypoint_engine_build_command_parses() -> None:
    text = GPU_ENTRYPOINT.read_text()
    match = re.search(r"^\s+engine-build build (.*?)--out \"\$engine\"", text, re.S | re.M)
    assert match, "the entrypoint builds the engine with engine-build build ... --out $engine"
    sample = {"$precision": "fp16", "$opt_batch": "8", "$max_batch": "16"}
    words = [sample.get(w.strip('"'), w.strip('"')) for w in match.group(1).replace("\\\n", " ").split()]
    args = engine_build_parser().parse_args(["build", *words, "--out", "/cache/e.plan"])
    assert (args.backend, args.precision, args.opt_batch, args.max_batch) == ("tensorrt", "fp16", 8, 16)


def _run_entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        [str(GPU_ENTRYPOINT), *args],
        env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gpu_entrypoint_uses_a_given_engine_without_building(tmp_path: Path) -> None:
    given = tmp_path / "mine.plan"
    result = _run_entrypoint(["config", "--json"], {"LOOKOUT_ENGINE": str(given)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["engine"]["engine"] == str(given)
    assert "building" not in result.stderr


def test_gpu_entrypoint_refuses_a_precision_it_cannot_build(tmp_path: Path) -> None:
    result = _run_entrypoint(["run"], {"LOOKOUT_CACHE_DIR": str(tmp_path), "LOOKOUT_TRT_PRECISION": "int8"})
    assert result.returncode == 2
    assert "LOOKOUT_TRT_PRECISION must be fp16 or fp32" in result.stderr


# ------------------------------------------------------------------------------- compose


def test_compose_lookout_services_use_settings_env_and_valid_commands() -> None:
    compose = _compose()
    services = _lookout_services(compose)
    assert {"worker", "replay", "dashboard"} <= set(services)
    known = set(settings_env())
    parser = stream_worker_parser()
    for name, service in services.items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        unknown = set(env) - known
        assert not unknown, f"compose service {name} sets variables lookout does not read: {unknown}"
        load_settings(env=env)  # values parse and validate, as the container would
        try:
            parser.parse_args(service["command"])
        except SystemExit:
            pytest.fail(
                f"compose service {name}: `stream-worker {' '.join(service['command'])}` does not parse"
            )


def test_compose_worker_drains_before_it_is_killed() -> None:
    worker = _compose()["services"]["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    drain_s = load_settings(env=env).ops.drain_deadline_s
    assert _seconds(worker["stop_grace_period"]) > drain_s


def test_compose_replay_feeds_the_workers_topic_with_footage_the_image_provides() -> None:
    compose = _compose()
    services = compose["services"]
    frames_topic = load_settings(env={k: str(v) for k, v in services["worker"]["environment"].items()})
    topic = frames_topic.topics.frames_topic
    created = services["topics"]["command"]
    assert created[created.index("--topic") + 1] in topic
    assert int(created[created.index("--partitions") + 1]) > 1

    replay = stream_worker_parser().parse_args(services["replay"]["command"])
    replay_env = {k: str(v) for k, v in services["replay"]["environment"].items()}
    assert (replay.topic or load_settings(env=replay_env).topics.frames_topic[0]) in topic
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for source in replay.sources:
        assert f"'{source}'" in dockerfile, f"the image does not provide {source}"
    build_args = services["replay"]["build"]["args"]
    assert "media" in build_args["EXTRAS"], "bikes.mp4 comes with the media extra"


def test_compose_dashboard_token_and_port_line_up() -> None:
    compose = _compose()
    dashboard = compose["services"]["dashboard"]
    env = {k: str(v) for k, v in dashboard["environment"].items()}
    settings = command_settings(dashboard["command"], env).dashboard
    (secret,) = dashboard["secrets"]
    assert settings.token_file == f"/run/secrets/{secret}"
    assert (COMPOSE.parent / compose["secrets"][secret]["file"]).read_text().strip()
    (published,) = dashboard["ports"]
    host, _, container_port = published.split(":")
    assert host == "127.0.0.1", "the demo dashboard is published on loopback only"
    assert int(container_port) == settings.port
    assert f":{settings.port}/healthz" in " ".join(dashboard["healthcheck"]["test"])
