"""``stream-worker``: argument parsing, logging set-up and the only ``sys.exit`` of lookout.

User mistakes (a bad flag, a missing engine, an unreachable broker) end in one line on stderr
that says what to do, with exit code 2; a worker that fails at run time exits 1 so that its
supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from stream_worker import __version__, opencv_environment
from stream_worker.errors import ConfigError, EngineError, LookoutError
from stream_worker.frames import SourceKind
from stream_worker.settings import (
    SECTIONS,
    Settings,
    Uses,
    add_flags,
    as_dict,
    check_engine_labels,
    env_only_help,
    load_settings,
)

log = logging.getLogger("lookout")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, what to do, exit 2 (argparse would print the whole usage)."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# What each command reads of the settings tree (section -> options; None: the whole section).
# Its --help lists exactly these, flags with their env variable, the rest in the epilog.
KAFKA_CLIENT = (
    "bootstrap", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password_file",
    "ssl_cafile", "ssl_certfile", "ssl_keyfile", "client_id",
)  # fmt: skip
REDIS_CLIENT = ("redis_url", "redis_username", "redis_password_file", "redis_ca_file", "key_prefix")
LOGGING = ("log_level", "log_format")
WORKER: Uses = dict.fromkeys(("kafka", "topics", "redis", "engine", "batch", "labels", "counts", "ops"))
USES: dict[str, Uses] = {
    "run": WORKER,
    "config": dict.fromkeys(SECTIONS),  # it prints every setting
    "replay": {"kafka": KAFKA_CLIENT, "topics": ("frames_topic",), "batch": ("max_pixels",), "ops": LOGGING},
    "counts": {"redis": REDIS_CLIENT, "ops": LOGGING},
    "demo": {  # a worker on topics, a group and a key prefix of the demo's own
        **WORKER,
        "topics": (),
        "redis": (*REDIS_CLIENT[:-1], "counts_ttl_s"),
        "ops": (
            "metrics_port",
            "metrics_host",
            "log_level",
            "log_format",
            "retry_max_s",
            "max_metric_sources",
        ),
        "dashboard": ("port",),
    },
    "dashboard": {"dashboard": None, "redis": REDIS_CLIENT, "counts": ("windows",), "ops": LOGGING},
    "acls": {
        "kafka": ("bootstrap", "sasl_username", "ssl_certfile"),
        "topics": (
            "frames_topic",
            "frames_pattern",
            "labels_topic",
            "counts_topic",
            "dlq_topic",
            "review_topic",
            "events_topic",
            "group",
        ),
        "ops": LOGGING,
    },
    "verify": {
        "kafka": KAFKA_CLIENT,
        "topics": ("frames_topic", "labels_topic", "counts_topic", "dlq_topic"),
        "redis": REDIS_CLIENT,
        "counts": ("windows", "event_gap_s"),
        "ops": LOGGING,
    },
    "review": {"kafka": KAFKA_CLIENT, "topics": ("review_topic",), "ops": LOGGING},
    "schema": {"ops": LOGGING},
}


def _command(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with the settings it uses that have no flag."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=env_only_help(USES[name]) or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML settings file (env LOOKOUT_CONFIG)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``stream-worker`` command line."""
    parser = _Parser(prog="stream-worker", description="lookout: Kafka-native image classification worker")
    parser.add_argument("--version", action="version", version=f"lookout {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = _command(sub, "run", "consume frames, publish labels and counts (the worker)")
    run.add_argument("--no-create-topics", action="store_true", help="do not create missing output topics")
    add_flags(run, USES["run"])

    config = _command(sub, "config", "print the effective settings, secrets redacted; exit 2 on a bad one")
    config.add_argument("--json", action="store_true", help="JSON instead of YAML")
    add_flags(config, USES["config"])

    replay = _command(sub, "replay", "replay videos / image folders / globs as camera feeds")
    replay.add_argument("sources", nargs="+", metavar="SOURCE", help="video file, image folder or glob")
    replay.add_argument("--topic", help="frames topic (default: the first --frames-topic)")
    replay.add_argument("--source-id", action="append", default=[], help="id of each source, in order")
    replay.add_argument(
        "--kind", default="traffic", choices=[k.value for k in SourceKind], help="source-kind header"
    )
    replay.add_argument("--site", help="site header")
    replay.add_argument(
        "--fps", type=float, default=10.0, help="frames per second per source (0 = as fast as possible)"
    )
    replay.add_argument("--quality", type=int, default=85, help="JPEG quality")
    replay.add_argument("--loop", action="store_true", help="start again at the end")
    replay.add_argument("--limit", type=int, default=0, help="frames per source (0 = all)")
    replay.add_argument("--resize", help="WIDTHxHEIGHT, e.g. 1920x1080 (upscales small footage)")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_flags(replay, USES["replay"])

    counts = _command(sub, "counts", "show the counts of a source")
    counts.add_argument("--source", required=True, help="source id")
    counts.add_argument("--window", default="1m", help="window name (one of --windows)")
    counts.add_argument("--json", action="store_true", help="print one JSON object")
    add_flags(counts, USES["counts"])

    demo = _command(sub, "demo", "services, engine, worker and real street footage, with live counts")
    demo.add_argument("--seconds", type=float, default=60.0, help="how long to run (Ctrl-C ends it sooner)")
    demo.add_argument("--cameras", type=int, default=3, help="how many cameras replay the footage")
    demo.add_argument("--fps", type=float, default=5.0, help="frames per second per camera")
    demo.add_argument("--no-services", action="store_true", help="use already running Kafka/Redis")
    add_flags(demo, USES["demo"])

    dashboard = _command(sub, "dashboard", "serve the live dashboard: counts, thumbnails, throughput, drift")
    add_flags(dashboard, USES["dashboard"])

    acls = _command(
        sub, "acls", "print the kafka-acls.sh commands that grant the worker what it needs, and no more"
    )
    acls.add_argument("--principal", help="e.g. User:lookout (default: the SASL user)")
    acls.add_argument("--no-create-topics", action="store_true", help="output topics are made beforehand")
    acls.add_argument("--command-config", default="admin.properties", help="the admin's kafka-acls.sh config")
    # It takes every flag of `run` (so one command line serves both) and lists those it reads.
    add_flags(acls, USES["acls"], accepts=USES["run"])

    verify = _command(
        sub, "verify", "check frames in against labels, dead letters and counts out (exit 0 only when exact)"
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    add_flags(verify, USES["verify"])

    review = _command(
        sub, "review", "export the frames sampled for review as image files and a manifest, to be labelled"
    )
    review.add_argument(
        "action", choices=["export"], help="export: write DIR/_unsorted/*.jpg|png and DIR/manifest.csv"
    )
    review.add_argument(
        "--out", required=True, help="folder to write into (frames exported before are skipped)"
    )
    review.add_argument("--limit", type=int, help="write at most this many new images")
    add_flags(review, USES["review"])

    schema = _command(
        sub, "schema", "print the JSON Schema of an output record or header contract (none: list them)"
    )
    schema.add_argument("name", nargs="?", help="label-record, window-counts-value, dead-letter-headers, ...")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the parsed flags (+ env + the optional YAML file)."""
    flags = {k: v for k, v in vars(args).items() if v is not None}
    return load_settings(flags=flags, config_file=getattr(args, "config", None))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``stream-worker`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        # Before any command imports cv2: OpenCV reads its own limits only then.
        os.environ.update(opencv_environment(settings.batch.max_pixels))
        check_engine_labels(settings)  # the named engine's own labels, still before any connection
        from stream_worker.observability import setup_logging

        setup_logging(settings.ops.log_level, settings.ops.log_format)
        code = COMMANDS[args.command](args, settings)
    except (ConfigError, EngineError) as exc:
        print(f"stream-worker: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except LookoutError as exc:
        print(f"stream-worker: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    data = as_dict(settings)
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.service import run_worker

    return asyncio.run(
        _with_signals(lambda stop: run_worker(settings, stop, create_topics=not args.no_create_topics))
    )


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from stream_worker.replay import ReplayOptions, ReplaySource, replay

    if args.source_id and len(args.source_id) != len(args.sources):
        raise ConfigError(
            f"give one --source-id per source ({len(args.sources)} sources, {len(args.source_id)} ids)"
        )
    ids = args.source_id or [f"{Path(s).stem or 'source'}-{i}" for i, s in enumerate(args.sources)]
    resize = None
    if args.resize:
        try:
            w, h = (int(v) for v in args.resize.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--resize takes WIDTHxHEIGHT, e.g. 1920x1080, not {args.resize!r}") from None
        resize = (w, h)
    sources = [
        ReplaySource(p, i, SourceKind(args.kind), args.site) for p, i in zip(args.sources, ids, strict=True)
    ]
    options = ReplayOptions(
        fps=args.fps, quality=args.quality, loop=args.loop, limit=args.limit, resize=resize
    )
    if not args.topic and not settings.topics.frames_topic:
        raise ConfigError(
            "replay needs a frames topic: pass --topic or --frames-topic (LOOKOUT_FRAMES_TOPIC)"
        )
    topic = args.topic or settings.topics.frames_topic[0]
    bar = None if args.no_progress else tqdm(unit="frame", desc=f"replay -> {topic}")

    async def go(stop: asyncio.Event) -> int:
        sent = await replay(
            settings.kafka,
            topic,
            sources,
            options,
            stop=stop,
            on_frame=(lambda _s: bar.update()) if bar is not None else None,
        )
        if bar is not None:
            bar.close()
        print(json.dumps({"topic": topic, "sent": sent}))
        return EXIT_OK

    return asyncio.run(_with_signals(go))


def _cmd_counts(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.service import read_counts

    report = asyncio.run(read_counts(settings, args.source, args.window))
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    print(format_counts_table(report))
    return EXIT_OK


def format_counts_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per window, one column per label."""
    labels = sorted(report["total"])
    if not report["windows"]:
        return f"no counts for source {report['source_id']!r} in window {report['window']!r}"
    header = ["window start (UTC)", "frames", *labels]
    rows = [header]
    import datetime as dt

    for w in report["windows"]:
        start = dt.datetime.fromtimestamp(w["start"] / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append([start, str(w["frames"]), *(str(w["counts"].get(label, 0)) for label in labels)])
    rows.append(
        [
            "total",
            str(sum(w["frames"] for w in report["windows"])),
            *(str(report["total"][lb]) for lb in labels),
        ]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(r)) for r in rows)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.demo import run_demo

    return asyncio.run(_with_signals(lambda stop: run_demo(settings, stop, args)))


def _cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.dashboard.server import run_dashboard
    from stream_worker.settings import read_secret

    d = settings.dashboard
    token = read_secret(d.token_file, "the dashboard token") if d.token_file else None
    return asyncio.run(
        _with_signals(lambda stop: run_dashboard(settings, stop, host=d.host, port=d.port, token=token))
    )


def _cmd_acls(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.acls import acl_commands, default_principal

    principal = args.principal or default_principal(settings)
    if ":" not in principal:
        raise ConfigError(f"--principal {principal!r} needs its type, e.g. User:{principal}")
    for line in acl_commands(
        settings, principal, create_topics=not args.no_create_topics, command_config=args.command_config
    ):
        print(line)
    return EXIT_OK


def _cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.review import export_review

    report = asyncio.run(export_review(settings, Path(args.out), limit=args.limit))
    print(
        f"review export: {report.written} new images in {args.out}/_unsorted "
        f"({report.already_there} exported before, {report.skipped} records not review samples); "
        f"file them under {args.out}/<label>/, then `engine-build finetune --data {args.out}`"
    )
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.schemas import SCHEMAS, schema_text

    print(schema_text(args.name) if args.name else "\n".join(SCHEMAS), end="" if args.name else "\n")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from stream_worker.verify import report_json, verify

    report = asyncio.run(verify(settings))
    print(report_json(report) if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_FAILED


async def _with_signals(body: Any) -> int:
    """Run ``body(stop)`` with SIGTERM/SIGINT setting ``stop`` (a second signal exits at once)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        log.info("signal %d: draining and stopping", signum)
        stop.set()

    # The handlers before the loop took over (the console entry's early SIGTERM handler): put
    # back once the loop is done, or a SIGTERM while the process exits would kill it (exit -15).
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in previous:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        result: int = await body(stop)
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    return result


COMMANDS = {
    "run": _cmd_run,
    "config": _cmd_config,
    "replay": _cmd_replay,
    "counts": _cmd_counts,
    "demo": _cmd_demo,
    "dashboard": _cmd_dashboard,
    "verify": _cmd_verify,
    "acls": _cmd_acls,
    "schema": _cmd_schema,
    "review": _cmd_review,
}


if __name__ == "__main__":
    main()
