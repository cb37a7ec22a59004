"""``engine-build``: export the model, fine-tune it, build CPU/GPU engines, evaluate and compare them.

User mistakes and stale or missing engines end with one line on stderr and exit code 2;
there is never a traceback for them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stream_worker.errors import ConfigError, EngineError, LookoutError

if TYPE_CHECKING:
    from engine_build.evaluate import PublishedReport

log = logging.getLogger("engine_build")

USER_ERROR = 2

PREPROCESS_HELP = (
    "override the model's resize mode: crop:FRACTION (centre crop, e.g. crop:0.875), "
    "letterbox (whole frame, padded to the input's aspect) or stretch (whole frame, aspect ignored)"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command and the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = _OneLineParser(
        prog="engine-build",
        description="Turn lookout's ONNX model into serving engines and measure them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    export = sub.add_parser("export", help="export the trained model to ONNX (needs the export extra)")
    export.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    export.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")

    build = sub.add_parser("build", help="build an engine (and its sidecar) from the ONNX model")
    build.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    build.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    build.add_argument("--out", type=Path, required=True, help="engine file to write (sidecar: OUT.json)")
    build.add_argument("--onnx", type=Path, default=None, help="source ONNX (default: the committed model)")
    build.add_argument(
        "--calib", type=Path, default=None, help="int8 calibration images (default: bundled real frames)"
    )
    build.add_argument("--calib-limit", type=_positive_int, default=256, help="max calibration images (256)")
    build.add_argument("--min-batch", type=_positive_int, default=1)
    build.add_argument("--opt-batch", type=_positive_int, default=8)
    build.add_argument("--max-batch", type=_positive_int, default=32)
    build.add_argument(
        "--timing-cache", type=Path, default=None, help="TensorRT timing cache (OUT.timing-cache)"
    )
    build.add_argument(
        "--workspace-mb", type=_positive_int, default=2048, help="TensorRT workspace (2048 MiB)"
    )
    quant = build.add_argument_group("CPU int8 quantisation (defaults: the recipe that keeps fp32's labels)")
    quant.add_argument("--quant-format", choices=("qdq", "qoperator"), default="qdq")
    quant.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    quant.add_argument(
        "--reduce-range", action="store_true", help="7-bit weights, for x86 CPUs without VNNI (less accurate)"
    )
    quant.add_argument(
        "--no-bias-correction", action="store_true", help="keep ONNX Runtime's biases (less agreement)"
    )
    quant.add_argument("--int8-first-conv", action="store_true", help="quantise the first convolution too")
    quant.add_argument(
        "--fp32-depthwise", action="store_true", help="keep depthwise convolutions in fp32 (more agreement)"
    )
    quant.add_argument(
        "--int8-first-depthwise",
        action="store_true",
        help="quantise the first depthwise convolution too (kept fp32 by default: half of int8's error)",
    )
    quant.add_argument("--int8-head", action="store_true", help="quantise the classifier head too")
    quant.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    quant.add_argument(
        "--calib-percentile", type=float, default=99.99, help="percentile kept by --calib-method percentile"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    finetune = sub.add_parser(
        "finetune", help="teach the model your labels: a new head trained on DIR/<label>/*.jpg|png"
    )
    finetune.add_argument(
        "--data", type=Path, required=True, help="DIR/<label>/*.jpg|png; nested folders give the hierarchy"
    )
    finetune.add_argument("--out", type=Path, required=True, help="fine-tuned ONNX model to write")
    finetune.add_argument("--onnx", type=Path, default=None, help="base model (default: the committed model)")
    finetune.add_argument("--name", default=None, help="model name in the metadata (default: BASE-finetuned)")
    finetune.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads")
    finetune.add_argument("--json", action="store_true", help="print one JSON object")
    finetune.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("evaluate", help="metrics of an engine on DIR/<leaf or unknown>/*.jpg|png")
    evaluate.add_argument("--engine", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads")
    evaluate.add_argument("--preprocess", metavar="SPEC", default=None, help=PREPROCESS_HELP)
    evaluate.add_argument(
        "--rollup-threshold",
        type=float,
        default=None,
        help="the worker's single-label roll-up threshold for the published label (default: the worker's)",
    )

    calibrate = sub.add_parser(
        "calibrate",
        help="fit a serving temperature and the roll-up/review thresholds on a labelled dev set",
        description="Fit a serving temperature (on the true label's score, grouped cross-fitting) and "
        "the roll-up and review thresholds (from precision/recall curves) on DIR, and write them into "
        "a copy of the model's metadata (key 'calibration'); the weights stay byte-identical. Workers "
        "serving an engine built from OUT use them unless you set the threshold yourself.",
    )
    calibrate.add_argument(
        "--onnx", type=Path, default=None, help="model to calibrate (default: the committed model)"
    )
    calibrate.add_argument(
        "--data",
        type=Path,
        required=True,
        help="DIR/<label>/*.jpg|png (any taxonomy label, or unknown); DIR/manifest.csv (path,label,group) "
        "gives the groups, else the file stem without its frame number",
    )
    calibrate.add_argument("--out", type=Path, required=True, help="calibrated ONNX model to write")
    calibrate.add_argument(
        "--target-precision",
        type=float,
        default=0.95,
        help="roll-up threshold: the lowest whose published-label precision reaches this (0.95)",
    )
    calibrate.add_argument(
        "--min-label-frames",
        type=_positive_int,
        default=20,
        help="frames (from 2+ groups) a label needs for a roll-up threshold of its own (20)",
    )
    calibrate.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads")
    calibrate.add_argument("--json", action="store_true", help="print one JSON object")

    compare = sub.add_parser("compare", help="agreement of two engines on the same images")
    compare.add_argument("--a", type=Path, required=True, help="first engine")
    compare.add_argument("--b", type=Path, required=True, help="second engine")
    compare.add_argument("--data", type=Path, required=True, help="folder of JPEG/PNG images (recursive)")
    compare.add_argument("--json", action="store_true", help="print one JSON object")
    compare.add_argument(
        "--preprocess", metavar="SPEC", default=None, help=PREPROCESS_HELP + " (both engines)"
    )
    compare.add_argument(
        "--preprocess-b",
        metavar="SPEC",
        default=None,
        help="override engine B's resize mode only: the same engine twice shows what a mode change does",
    )

    setpre = sub.add_parser(
        "set-preprocess",
        help="copy an ONNX model with another resize mode in its metadata (weights unchanged)",
    )
    setpre.add_argument("--onnx", type=Path, required=True, help="source ONNX model")
    setpre.add_argument("--preprocess", metavar="SPEC", required=True, help=PREPROCESS_HELP)
    setpre.add_argument("--out", type=Path, required=True, help="ONNX file to write (may be --onnx)")

    info = sub.add_parser("info", help="describe an engine and check it against this machine")
    info.add_argument("--engine", type=Path, required=True)
    info.add_argument("--json", action="store_true", help="print the sidecar as JSON")
    return parser


def _cmd_export(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        raise ConfigError("engine-build export needs PyTorch and the model packages: pip install '.[export]'")
    from engine_build.export import run_export

    path = run_export(args.out, args.opset)
    print(f"wrote {path}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from engine_build.default import default_onnx_path

    onnx_path = args.onnx or default_onnx_path()
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX model not found: {onnx_path}")
    if args.calib is not None and not args.calib.is_dir():
        raise ConfigError(f"calibration folder not found: {args.calib}")
    profile = (args.min_batch, args.opt_batch, args.max_batch)
    if args.backend == "onnxruntime":
        from engine_build.cpu import QuantOptions, build_cpu_engine

        if args.precision == "fp16":
            raise ConfigError("ONNX Runtime CPU engines are fp32 or int8; fp16 is for --backend tensorrt")
        sidecar = build_cpu_engine(
            onnx_path,
            args.out,
            precision=args.precision,
            calib_dir=args.calib,
            batch_profile=profile,
            quant=QuantOptions(
                quant_format=args.quant_format,
                per_channel=not args.per_tensor,
                reduce_range=args.reduce_range,
                keep_head_fp32=not args.int8_head,
                keep_first_conv_fp32=not args.int8_first_conv,
                keep_depthwise_fp32=args.fp32_depthwise,
                keep_first_depthwise_fp32=not args.int8_first_depthwise,
                calibrate_method=args.calib_method,
                calibrate_percentile=args.calib_percentile,
                bias_correction=not args.no_bias_correction,
            ),
            calibration_limit=args.calib_limit,
            progress=not args.quiet,
        )
    else:
        from engine_build.tensorrt import build_tensorrt_engine

        sidecar = build_tensorrt_engine(
            onnx_path,
            args.out,
            precision=args.precision,
            batch_profile=profile,
            calib_dir=args.calib,
            timing_cache=args.timing_cache,
            workspace_bytes=args.workspace_mb << 20,
            calibration_limit=args.calib_limit,
            progress=not args.quiet,
        )
    print(f"wrote {args.out} ({sidecar.backend} {sidecar.precision}, batch {profile[0]}..{profile[2]})")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from engine_build.finetune import finetune

    report = finetune(
        args.data,
        args.out,
        base_onnx=args.onnx,
        name=args.name,
        threads=args.threads,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    trained, chosen = report.trained, report.trained.chosen
    counts = ", ".join(f"{label} {n}" for label, n in report.counts.items())
    tree = [f"{parent} > {label}" for label, parent in report.taxonomy_parents().items() if parent]
    print(f"images      {sum(report.counts.values())} in {len(report.counts)} labels: {counts}")
    print(f"data        sha256 {report.data_sha256}")
    print(
        f"features    {report.base_model}, {report.feature_tensor} ({report.feature_dim} per image), "
        f"{report.features_s:.1f} s"
    )
    print(
        f"head        L2 penalty {trained.l2:g}, chosen by {trained.folds}-fold stratified cross-validation "
        f"over {len(trained.scores)} values, {report.head_s:.1f} s"
    )
    print(
        f"cv          accuracy {chosen.accuracy:.4f}, balanced {chosen.balanced_accuracy:.4f} "
        "(images held out of the fit)"
    )
    bound = " (at its bound: the held-out images cannot tell how confident to be)"
    print(
        f"calibration temperature {trained.temperature:.3f}: held-out log-loss "
        f"{trained.oof_log_loss:.4f} -> {trained.oof_log_loss_calibrated:.4f}"
        f"{bound if trained.temperature_at_bound else ''}"
    )
    print(f"taxonomy    {report.taxonomy['version']}{' (' + ', '.join(tree) + ')' if tree else ''}")
    print(f"wrote {args.out} ({report.model_name} {report.model_version})")
    print(f"next: engine-build build --onnx {args.out} --out ENGINE.onnx")
    print("      stream-worker run --engine ENGINE.onnx ...")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from engine_build.evaluate import evaluate_engine, override_preprocessing, served_rollup
    from stream_worker.backends.registry import open_backend
    from stream_worker.taxonomy import Taxonomy

    if not args.data.is_dir():
        raise ConfigError(f"data folder not found: {args.data}")
    if args.rollup_threshold is not None and not 0.0 < args.rollup_threshold <= 1.0:
        raise ConfigError(f"--rollup-threshold must be in (0, 1], got {args.rollup_threshold:g}")
    backend = open_backend(args.engine, threads=args.threads)
    try:
        spec = override_preprocessing(backend.info.spec, args.preprocess)
        taxonomy = Taxonomy.for_engine(backend.info)
        # As the worker would publish: the engine's fitted roll-up thresholds unless one is given.
        threshold, per_label = served_rollup(backend.info.calibration, args.rollup_threshold)
        report = evaluate_engine(
            backend,
            args.data,
            taxonomy,
            spec=spec,
            rollup_threshold=threshold,
            rollup_label_thresholds=per_label,
        )
    finally:
        backend.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"engine   {args.engine} ({backend.info.backend} {backend.info.precision}, {spec.describe()})")
    print(f"images   {report.n} with a leaf label (best leaf by score)")
    print(f"accuracy {report.accuracy:.4f}")
    print(
        f"macro    precision {report.macro_precision:.4f}  recall {report.macro_recall:.4f}  "
        f"F1 {report.macro_f1:.4f}"
    )
    auc = "n/a (needs two labels)" if report.auc_roc_macro is None else f"{report.auc_roc_macro:.4f}"
    print(f"AUC-ROC  {auc} (one-vs-rest, macro)")
    cal = report.meta["calibration"]
    for name, title in (("top_label", "best leaf"), ("published", "published label")):
        print(
            f"ECE      {cal['before'][name]['ece']:.4f} -> {cal['after'][name]['ece']:.4f} ({title}, 15 bins;"
            f" before -> at serving temperature {cal['serving_temperature']:.3g})"
        )
    print()
    print(f"{'label':<12} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7} {'auc':>7}")
    for label, m in report.per_class.items():
        auc_l = report.auc_roc_per_class.get(label)
        auc_text = f"{auc_l:7.3f}" if auc_l is not None else f"{'-':>7}"
        print(f"{label:<12} {m.precision:9.3f} {m.recall:7.3f} {m.f1:7.3f} {m.support:7d} {auc_text}")
    print()
    print("confusion (rows: true, columns: predicted)")
    width = max(5, *(len(lab) for lab in report.labels))
    print(" " * (width + 1) + " ".join(f"{lab[:width]:>{width}}" for lab in report.labels))
    for label, row in zip(report.labels, report.confusion, strict=True):
        print(f"{label:<{width}} " + " ".join(f"{v:>{width}d}" for v in row))
    if report.published is not None:
        _print_published(report.published)
    return 0


def _print_published(published: PublishedReport) -> None:
    from engine_build.evaluate import wilson_interval

    overall = published.overall
    low, high = wilson_interval(overall.right, overall.n)
    g_low, g_high = published.accuracy_group95
    print()
    print(
        f"published label (single mode, roll-up threshold {published.rollup_threshold:g}): right = the true "
        "label or one of its parents"
    )
    print(
        f"all      {overall.right}/{overall.n} right ({overall.leaf} leaf, {overall.ancestor} parent), "
        f"{overall.unknown} unknown, {overall.wrong} wrong; accuracy {overall.right / overall.n:.3f} "
        f"(95 %: {low:.3f}-{high:.3f} over images, {g_low:.3f}-{g_high:.3f} over {len(published.per_group)} "
        "groups)"
    )
    header = f"{'label':<12} {'n':>4} {'right':>5} {'leaf':>5} {'parent':>6} {'unknown':>7} {'wrong':>5}"
    print(f"{header}  95 % (images)")
    for label, c in published.per_label.items():
        low, high = wilson_interval(c.right, c.n)
        print(
            f"{label:<12} {c.n:4d} {c.right:5d} {c.leaf:5d} {c.ancestor:6d} {c.unknown:7d} {c.wrong:5d}  "
            f"{low:.2f}-{high:.2f}"
        )
    print()
    print(f"{'group':<34} {'label':<12} {'n':>4} {'right':>5} {'unknown':>7} {'wrong':>5} {'best leaf':>9}")
    for group, c in published.per_group.items():
        print(
            f"{group[:34]:<34} {published.group_label[group]:<12} {c.n:4d} {c.right:5d} {c.unknown:7d} "
            f"{c.wrong:5d} {published.best_leaf_right[group]:9d}"
        )


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from engine_build.calibrate import calibrate_model
    from engine_build.default import default_onnx_path

    onnx_path = args.onnx or default_onnx_path()
    fit = calibrate_model(
        onnx_path,
        args.data,
        args.out,
        target_precision=args.target_precision,
        min_label_frames=args.min_label_frames,
        threads=args.threads,
    )
    if args.json:
        print(json.dumps(fit.to_dict(), indent=2))
        return 0
    cal = fit.calibration
    counts = ", ".join(f"{label} {n}" for label, n in sorted(fit.counts.items()))
    print(f"data         {fit.n} images in {fit.groups} groups ({counts}), {fit.folds} grouped folds")
    bound = " (at its bound)" if fit.temperature_at_bound else ""
    folds = ", ".join(f"{t:.3f}" for t in fit.fold_temperatures)
    print(f"temperature  {cal.serving_temperature:.4f}{bound}; per fold (fitted without it): {folds}")
    if not cal.fitted.get("temperature_kept", True):
        print("             not kept: held out, it did not beat T = 1 (NLL below), so T = 1 is served")
    print()
    print(f"{'':26} {'before':>8} {'after':>8}")
    print(f"{'NLL of the true label':26} {fit.nll['before']:8.4f} {fit.nll['after_cross_fitted']:8.4f}")
    for name, title in (("top_label", "ECE, best leaf"), ("published", "ECE, published label")):
        e = fit.ece[name]
        print(f"{title:26} {e['before']:8.4f} {e['after_cross_fitted']:8.4f}")
    print("before: raw output at the built-in roll-up threshold 0.4; after: each fold at a T fitted")
    print("without it (cross-fitted) and at the fitted thresholds")
    print()
    print(f"{'roll-up t':>9} {'precision':>9} {'coverage':>8} {'recall':>7} {'published':>9}")
    for p in fit.rollup_curve:
        mark = "  <- chosen" if p.threshold == cal.rollup_threshold else ""
        print(
            f"{p.threshold:9.2f} {p.precision:9.3f} {p.coverage:8.3f} {p.recall:7.3f} {p.published:9d}{mark}"
        )
    reached = (
        ""
        if fit.target_reached
        else f" (no threshold reaches precision {fit.target_precision}: most precise)"
    )
    per_label = dict(cal.rollup_label_thresholds) or "none"
    print(f"roll-up threshold {cal.rollup_threshold:g}{reached}; per label: {per_label}")
    held = fit.held_out_rule
    print(
        f"  the rule, chosen without each fold and applied to it: precision {held['precision']:.3f}, "
        f"coverage {held['coverage']:.3f}"
    )
    chosen = next(p for p in fit.review_curve if p.threshold == cal.review_threshold)
    print(
        f"review threshold {cal.review_threshold:g}: highest F1 {chosen.f1:.3f} at finding wrong labels "
        f"(precision {chosen.precision:.3f}, recall {chosen.recall:.3f})"
    )
    print(f"wrote {args.out} (data sha256 {fit.data_sha256[:12]})")
    print(f"next: engine-build build --onnx {args.out} --out ENGINE.onnx")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from engine_build.evaluate import compare, override_preprocessing
    from engine_build.imagefolder import folder_sources
    from stream_worker.backends.registry import open_backend
    from stream_worker.taxonomy import Taxonomy

    sources = folder_sources(args.data)
    a = open_backend(args.a)
    try:
        b = open_backend(args.b)
        try:
            spec_a = override_preprocessing(a.info.spec, args.preprocess)
            spec_b = override_preprocessing(b.info.spec, args.preprocess_b or args.preprocess)
            result = compare(a, b, sources, Taxonomy.for_engine(a.info), spec_a=spec_a, spec_b=spec_b)
        finally:
            b.close()
    finally:
        a.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"images            {result.n}")
    if spec_a != spec_b:
        print(f"preprocessing     a: {spec_a.describe()}, b: {spec_b.describe()}")
    print(f"top-1 agreement   {result.top1_agreement:.4f} (the model's own classes)")
    print(f"label agreement   {result.label_agreement:.4f} (best taxonomy leaf)")
    print(
        f"published label   {result.published_label_agreement:.4f} "
        "(the label the worker publishes with each engine's fitted thresholds)"
    )
    print(f"max |p_a - p_b|   {result.max_abs_diff:.6f}")
    print(f"mean |p_a - p_b|  {result.mean_abs_diff:.6f}")
    for name in result.disagreements[:10]:
        print(f"  top-1 differs: {name}")
    return 0


def _cmd_set_preprocess(args: argparse.Namespace) -> int:
    from engine_build.export import set_preprocessing

    spec = set_preprocessing(args.onnx, args.out, args.preprocess)
    print(f"wrote {args.out} (preprocessing {spec.describe()}; weights unchanged)")
    print(f"next: engine-build build --onnx {args.out} --out ENGINE.onnx")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from stream_worker.backends.registry import verify_engine
    from stream_worker.backends.sidecar import read_sidecar

    sidecar = read_sidecar(args.engine)
    try:
        verify_engine(args.engine)
        status = "ok: loads on this machine"
    except EngineError as exc:
        status = f"stale: {exc}"
    if args.json:
        print(json.dumps({**json.loads(sidecar.to_json()), "status": status}, indent=2))
        return 0
    spec = sidecar.spec
    taxonomy_source = "the model's own" if sidecar.taxonomy else "packaged"
    rows = [
        ("engine", str(args.engine)),
        ("backend", f"{sidecar.backend} {sidecar.runtime_version}"),
        ("precision", sidecar.precision),
        ("batch", f"min {sidecar.min_batch} / opt {sidecar.opt_batch} / max {sidecar.max_batch}"),
        ("model", f"{sidecar.model_name} {sidecar.model_version} ({len(sidecar.class_names)} classes)"),
        ("onnx", f"{sidecar.onnx_path} sha256 {sidecar.onnx_sha256[:16]}..."),
        ("input", f"{sidecar.input_name} 3x{spec.height}x{spec.width} {spec.colour_order} {spec.describe()}"),
        ("taxonomy", f"{sidecar.taxonomy_version} ({taxonomy_source})"),
        ("gpu", sidecar.gpu_name or "-"),
        ("created", sidecar.created_at),
        ("status", status),
    ]
    for key, value in rows:
        print(f"{key:<10} {value}")
    return 0


COMMANDS = {
    "export": _cmd_export,
    "build": _cmd_build,
    "finetune": _cmd_finetune,
    "evaluate": _cmd_evaluate,
    "calibrate": _cmd_calibrate,
    "compare": _cmd_compare,
    "set-preprocess": _cmd_set_preprocess,
    "info": _cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``engine-build``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, EngineError) as exc:
        print(f"engine-build: error: {exc}", file=sys.stderr)
        return USER_ERROR
    except LookoutError as exc:
        print(f"engine-build: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engine-build: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
