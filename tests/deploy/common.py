"""What the deployment tests compare the manifests with: the real settings declarations, the
Dockerfiles as parsed instructions, and the stream-worker command line."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_worker.cli import build_parser
from stream_worker.settings import SECTIONS, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"


def settings_env() -> dict[str, dataclasses.Field[object]]:
    """Every environment variable lookout's settings read, with its option."""
    return {f.metadata["env"]: f for section in SECTIONS.values() for f in dataclasses.fields(section)}


def file_env_names() -> set[str]:
    """Settings whose value is the path of a file the worker reads (secrets, CA, client cert)."""
    return {env for env, f in settings_env().items() if f.name.endswith("file")}


def settings_default(env: str) -> object:
    """The declared default of the option read from ``env``."""
    f = settings_env()[env]
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, comments dropped."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1] if " CMD " in text else ""
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile (enough of the grammar for lookout's Dockerfiles)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    return instructions


def env_assignments(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV NAME=value ...`` assignments of all stages (last one wins)."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                name, sep, value = token.partition("=")
                if sep:
                    out[name] = value
    return out


def shell_words(text: str) -> list[str]:
    """Split a command line the way a POSIX shell would (quotes only, no expansion)."""
    return shlex.split(text)


ENV_REFERENCE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")


def command_settings(args: list[str], env: dict[str, str]) -> Settings:
    """The settings ``stream-worker ARGS`` would run with in environment ``env`` (flags win)."""
    parsed = build_parser().parse_args(args)
    flags = {k: v for k, v in vars(parsed).items() if v is not None}
    return load_settings(flags=flags, env=env)
