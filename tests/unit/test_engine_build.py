"""Engine builds, sidecars and their compatibility checks, and the engine-build CLI's errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine_build.cpu import QuantOptions, build_cpu_engine, nodes_kept_fp32
from engine_build.imagefolder import iter_batches, path_sources, real_frame_sources, sample_photo
from stream_worker.backends.onnxruntime import session_options
from stream_worker.backends.registry import open_backend, verify_engine
from stream_worker.backends.sidecar import Sidecar, check_compatible, read_sidecar, sha256_file, sidecar_path
from stream_worker.errors import ConfigError, EngineError
from stream_worker.preprocess import PreprocessSpec, preprocess_into
from stream_worker.taxonomy import Taxonomy
from tests.unit.engine_fixtures import COMMITTED_ONNX, REPO_ROOT, build_tiny_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, Path, Sidecar]:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    engine = tmp_path / "tiny-fp32.onnx"
    sidecar = build_cpu_engine(onnx_path, engine, precision="fp32")
    return onnx_path, engine, sidecar


def test_sidecar_describes_the_engine(tiny: tuple[Path, Path, Sidecar]) -> None:
    onnx_path, engine, sidecar = tiny
    assert read_sidecar(engine) == sidecar
    assert (sidecar.backend, sidecar.precision) == ("onnxruntime", "fp32")
    assert (sidecar.min_batch, sidecar.opt_batch, sidecar.max_batch) == (1, 8, 32)
    assert sidecar.onnx_sha256 == sha256_file(onnx_path)
    assert sidecar.engine_sha256 == sha256_file(engine)
    assert sidecar.model_version == "test-1"
    assert sidecar.taxonomy_version == Taxonomy.load().version
    assert len(sidecar.class_names) == 1000
    assert sidecar.spec.height == 224


def test_sidecars_without_an_own_taxonomy_keep_their_shape(tiny: tuple[Path, Path, Sidecar]) -> None:
    _, engine, sidecar = tiny
    assert sidecar.taxonomy is None
    text = sidecar_path(engine).read_text()
    assert "taxonomy" not in json.loads(text)  # as sidecars were before models carried one
    assert Sidecar.from_json(text) == sidecar
    own = dataclasses.replace(sidecar, taxonomy={"version": "pets-1", "labels": [], "mapping": {}})
    assert Sidecar.from_json(own.to_json()) == own
    with pytest.raises(EngineError, match="taxonomy must be a mapping"):
        Sidecar.from_json(text.replace('"taxonomy_version"', '"taxonomy": [1],\n  "taxonomy_version"'))


def test_runtime_mismatch_fails_with_the_rebuild_command(tiny: tuple[Path, Path, Sidecar]) -> None:
    _, engine, sidecar = tiny
    old = dataclasses.replace(sidecar, runtime_version="1.16.3")
    with pytest.raises(EngineError) as excinfo:
        check_compatible(old, "1.32.0", sidecar.onnx_sha256, engine_path=engine)
    message = str(excinfo.value)
    assert "built with onnxruntime 1.16.3, running 1.32.0" in message
    assert f"engine-build build --backend onnxruntime --precision fp32 --out {engine}" in message


def test_patch_releases_of_onnxruntime_stay_compatible(tiny: tuple[Path, Path, Sidecar]) -> None:
    _, engine, sidecar = tiny
    check_compatible(
        dataclasses.replace(sidecar, runtime_version="1.32.0"), "1.32.7", None, engine_path=engine
    )


def test_tensorrt_engine_is_tied_to_its_gpu(tiny: tuple[Path, Path, Sidecar]) -> None:
    _, engine, sidecar = tiny
    plan = dataclasses.replace(
        sidecar, backend="tensorrt", precision="fp16", runtime_version="10.9.0.34", gpu_name="NVIDIA L4"
    )
    check_compatible(plan, "10.9.0.34", None, engine_path=engine, gpu_name="NVIDIA L4")
    with pytest.raises(EngineError, match="built for GPU NVIDIA L4, running on NVIDIA H100") as excinfo:
        check_compatible(plan, "10.9.0.34", None, engine_path=engine, gpu_name="NVIDIA H100")
    assert "--backend tensorrt --precision fp16" in str(excinfo.value)


def test_engine_fails_to_load_after_its_onnx_changes(tiny: tuple[Path, Path, Sidecar]) -> None:
    onnx_path, engine, _ = tiny
    build_tiny_onnx(onnx_path, seed=7)
    with pytest.raises(EngineError, match=r"source ONNX .* changed since the build"):
        open_backend(engine)


def test_engine_replaced_without_its_sidecar_fails_to_load(
    tmp_path: Path, tiny: tuple[Path, Path, Sidecar]
) -> None:
    _, engine, _ = tiny
    other = build_cpu_engine(
        build_tiny_onnx(tmp_path / "other.onnx", seed=5), tmp_path / "other-fp32.onnx", precision="fp32"
    )
    assert other.engine_sha256 != sha256_file(engine)
    engine.write_bytes((tmp_path / "other-fp32.onnx").read_bytes())
    with pytest.raises(EngineError, match="does not match its sidecar"):
        verify_engine(engine)


def test_missing_sidecar_and_missing_engine_say_what_to_do(
    tiny: tuple[Path, Path, Sidecar], tmp_path: Path
) -> None:
    _, engine, _ = tiny
    sidecar_path(engine).unlink()
    with pytest.raises(EngineError, match="has no sidecar"):
        open_backend(engine)
    with pytest.raises(EngineError, match=r"engine not found.*engine-build build"):
        open_backend(tmp_path / "nope.onnx")


def test_bad_batch_profile_and_precision_are_user_errors(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        build_cpu_engine(onnx_path, tmp_path / "e.onnx", precision="fp32", batch_profile=(4, 2, 8))
    with pytest.raises(ConfigError, match="fp32 or int8"):
        build_cpu_engine(onnx_path, tmp_path / "e.onnx", precision="fp16")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_build_without_tensorrt_is_a_one_line_error(tmp_path: Path) -> None:
    from engine_build.tensorrt import build_tensorrt_engine

    with pytest.raises(EngineError) as excinfo:
        build_tensorrt_engine(
            build_tiny_onnx(tmp_path / "t.onnx"),
            tmp_path / "t.plan",
            precision="fp16",
            batch_profile=(1, 8, 32),
        )
    assert "pip install 'lookout[gpu]'" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def _top_class_and_leaf(engine: Path, photo: str) -> tuple[str, str]:
    backend = open_backend(engine)
    (source,) = path_sources([sample_photo(photo)])
    batch = np.empty((1, *backend.info.input_shape), np.float32)
    preprocess_into(source.load(), batch[0], backend.info.spec)
    probs = backend.infer(batch)
    taxonomy = Taxonomy.for_engine(backend.info)
    leaf = taxonomy.leaves[int(taxonomy.scores(probs)[0, : len(taxonomy.leaves)].argmax())]
    return backend.info.class_names[int(probs[0].argmax())], leaf


@pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")
def test_fp32_and_int8_engines_both_see_the_cat(tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32.onnx"
    int8 = tmp_path / "int8.onnx"
    build_cpu_engine(COMMITTED_ONNX, fp32, precision="fp32")
    # The default recipe, calibration included: tiger cat and Egyptian cat are 0.03 apart in fp32.
    sidecar = build_cpu_engine(COMMITTED_ONNX, int8, precision="int8", progress=False)
    assert sidecar.build["calibration_images"] > 0
    assert int8.stat().st_size < fp32.stat().st_size / 2  # int8 weights really are stored as int8
    fp32_class, fp32_leaf = _top_class_and_leaf(fp32, "chelsea.png")
    int8_class, int8_leaf = _top_class_and_leaf(int8, "chelsea.png")
    assert fp32_leaf == int8_leaf == "cat"
    assert fp32_class == int8_class


@pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")
def test_int8_can_keep_depthwise_convolutions_in_fp32(tmp_path: Path) -> None:
    import onnx

    int8 = tmp_path / "int8-dw.onnx"
    options = QuantOptions(keep_depthwise_fp32=True)
    build_cpu_engine(
        COMMITTED_ONNX, int8, precision="int8", progress=False, calibration_limit=16, quant=options
    )
    graph = onnx.load(str(int8)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    first, pointwise = convs[0], [n for n in convs[1:] if n not in depthwise]
    assert len(depthwise) == 16 and len(pointwise) == 32  # EfficientNet-Lite0's 49 convolutions
    assert not any(n.input[1] in dequantized for n in [first, *depthwise])  # float weights, float kernel
    assert all(n.input[1] in dequantized for n in pointwise)  # int8 weights everywhere else
    recorded = json.loads(json.dumps(dataclasses.asdict(options)))  # the sidecar is JSON: lists
    assert recorded == read_sidecar(int8).build["quantization"]
    assert _top_class_and_leaf(int8, "chelsea.png")[1] == "cat"
    # Served, the depthwise convolutions really run in fp32: ONNX Runtime's WeightBiasQuantization
    # would round their weights per tensor (the worker's session options turn it off), and the
    # output would stray from the same graph run op by op in float (L1 0.45 per image, vs 0.04).
    backend = open_backend(int8)
    _, frames = next(iter_batches(real_frame_sources()[::10], backend.info.spec, 8))
    simulated_options = session_options(1)
    simulated_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    simulated = ort.InferenceSession(str(int8), simulated_options).run(
        None, {backend.info.input_name: frames}
    )[0]
    assert np.abs(backend.infer(frames) - simulated).sum(axis=1).mean() < 0.15


@pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")
def test_int8_can_keep_the_first_depthwise_convolution_in_fp32_without_adding_quantize_nodes(
    tmp_path: Path,
) -> None:
    """The most quantisation-sensitive layer (bench/int8_sensitivity.py) joins the first
    convolution's fp32 island: every other convolution stays int8 and the engine has no more
    QuantizeLinear/DequantizeLinear nodes than without it (each extra pair costs speed)."""
    import onnx

    graphs = {}
    for keep in (False, True):
        engine = tmp_path / f"int8-{keep}.onnx"
        options = QuantOptions(keep_first_depthwise_fp32=keep)
        build_cpu_engine(
            COMMITTED_ONNX, engine, precision="int8", progress=False, calibration_limit=8, quant=options
        )
        graphs[keep] = onnx.load(str(engine)).graph
    graph = graphs[True]
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    first_depthwise = next(n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute))
    in_float = [n.name for n in convs if n.input[1] not in dequantized]
    assert in_float == [convs[0].name, first_depthwise.name]

    def quantize_nodes(g: Any) -> int:
        return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)

    assert quantize_nodes(graphs[True]) <= quantize_nodes(graphs[False])
    assert _top_class_and_leaf(tmp_path / "int8-True.onnx", "chelsea.png")[1] == "cat"


@pytest.mark.skipif(not COMMITTED_ONNX.is_file(), reason=f"{COMMITTED_ONNX} not exported yet")
def test_keeping_a_node_the_model_does_not_have_in_fp32_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no_such_conv"):
        nodes_kept_fp32(COMMITTED_ONNX, QuantOptions(keep_nodes_fp32=("no_such_conv",)))


def _weight_and_bias_dequantizers(engine: Path) -> list[tuple[Any, Any, np.ndarray, np.ndarray, np.ndarray]]:
    """``(conv, weight DQ, int8 weights, weight scales, int32 biases)`` of every int8 Conv."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(engine)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    rows = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        weight_dq, bias_dq = producer.get(conv.input[1]), producer.get(conv.input[2])
        if weight_dq is not None and weight_dq.op_type == "DequantizeLinear" and bias_dq is not None:
            rows.append(
                (
                    conv,
                    weight_dq,
                    inits[weight_dq.input[0]],
                    inits[weight_dq.input[1]],
                    inits[bias_dq.input[0]],
                )
            )
    return rows


def test_default_int8_recipe_is_8_bit_per_channel_bias_corrected_with_first_convs_and_head_in_fp32(
    tmp_path: Path,
) -> None:
    """The recipe measured to keep fp32's labels on VNNI CPUs (docs/MODEL_CARD.md). The old
    default (7-bit weights, every convolution int8, no bias correction) fails it."""
    import onnx

    options = QuantOptions()
    assert (options.quant_format, options.per_channel, options.calibrate_method) == ("qdq", True, "minmax")
    assert not options.reduce_range and options.bias_correction
    if COMMITTED_ONNX.is_file():
        nodes = onnx.load(str(COMMITTED_ONNX)).graph.node
        first_conv = next(n.name for n in nodes if n.op_type == "Conv")
        first_depthwise = next(
            n.name
            for n in nodes
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
        )
        kept = {n.name: n.op_type for n in nodes if n.name in nodes_kept_fp32(COMMITTED_ONNX, options)}
        assert sorted(kept.values()) == ["Conv", "Conv", "Gemm", "Softmax"]
        assert first_conv in kept and first_depthwise in kept

    # The tiny model's one convolution is its first: quantise it to look at the weights.
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    engines = {}
    for corrected in (True, False):
        engines[corrected] = tmp_path / f"int8-{corrected}.onnx"
        sidecar = build_cpu_engine(
            onnx_path,
            engines[corrected],
            precision="int8",
            progress=False,
            calibration_limit=16,
            quant=dataclasses.replace(options, keep_first_conv_fp32=False, bias_correction=corrected),
        )
    assert sidecar.build["quantization"]["reduce_range"] is False
    (default,) = _weight_and_bias_dequantizers(engines[True])
    (uncorrected,) = _weight_and_bias_dequantizers(engines[False])
    _conv, _dq, weights, scales, bias = default
    assert weights.dtype == np.int8 and scales.shape == (weights.shape[0],)  # per output channel
    # 8-bit symmetric: every channel's largest weight lands on +-127 (7-bit would stop at 64).
    assert np.array_equal(
        np.abs(weights.astype(np.int32)).max(axis=(1, 2, 3)), np.full(weights.shape[0], 127)
    )
    assert np.array_equal(weights, uncorrected[2])  # bias correction leaves the weights alone
    assert not np.array_equal(bias, uncorrected[4])  # ... and moves the biases


def test_bias_correction_takes_back_the_mean_shift_of_rounded_weights(tmp_path: Path) -> None:
    """The corrected bias differs from ONNX Runtime's by exactly ``-(W_q - W) . mean(input)``."""
    import onnx
    from onnx import numpy_helper

    from engine_build.bias_correction import bias_shift
    from engine_build.cpu import calibration_sources

    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    engines = {c: tmp_path / f"int8-{c}.onnx" for c in (True, False)}
    for corrected, path in engines.items():
        quant = QuantOptions(bias_correction=corrected, keep_first_conv_fp32=False)
        build_cpu_engine(onnx_path, path, precision="int8", progress=False, calibration_limit=16, quant=quant)
    (conv, _dq, weights, scales, bias), (_, _, _, _, raw_bias) = (
        _weight_and_bias_dequantizers(engines[True])[0],
        _weight_and_bias_dequantizers(engines[False])[0],
    )
    float_weights = numpy_helper.to_array(
        next(i for i in onnx.load(str(onnx_path)).graph.initializer if i.name == "conv_w")
    )
    spec = open_backend(engines[True]).info.spec
    images = np.concatenate([b.copy() for _, b in iter_batches(calibration_sources(None, 16), spec, 8)])
    shift = bias_shift(weights * scales[:, None, None, None] - float_weights, 1, images.mean(axis=(0, 2, 3)))
    graph = onnx.load(str(engines[True])).graph
    producer = {out: n for n in graph.node for out in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    scale = inits[producer[conv.input[2]].input[1]].astype(np.float64)
    np.testing.assert_allclose((bias.astype(np.float64) - raw_bias) * scale, -shift, atol=2 * scale.max())


# --- CLI: user mistakes end with one line on stderr and exit code 2 -------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine_build.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0]


def test_cli_missing_engine_is_one_line(tmp_path: Path) -> None:
    _assert_one_line_error(
        _cli("evaluate", "--engine", str(tmp_path / "missing.onnx"), "--data", str(tmp_path)),
        "engine not found",
    )


def test_cli_bad_flag_is_one_line() -> None:
    _assert_one_line_error(_cli("build", "--precision", "fp64", "--out", "x.onnx"), "invalid choice: 'fp64'")
    _assert_one_line_error(_cli("build", "--max-batch", "0", "--out", "x.onnx"), "must be at least 1")


def test_cli_fp16_on_cpu_is_one_line(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    result = _cli("build", "--precision", "fp16", "--onnx", str(onnx_path), "--out", str(tmp_path / "e.onnx"))
    _assert_one_line_error(result, "fp16 is for --backend tensorrt")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_tensorrt_without_gpu_is_one_line(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    result = _cli(
        "build",
        "--backend",
        "tensorrt",
        "--precision",
        "fp16",
        "--onnx",
        str(onnx_path),
        "--out",
        str(tmp_path / "e.plan"),
    )
    _assert_one_line_error(result, "pip install 'lookout[gpu]'")


def test_cli_build_then_info(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    engine = tmp_path / "e.onnx"
    built = _cli(
        "build", "--onnx", str(onnx_path), "--out", str(engine), "--max-batch", "16", "--opt-batch", "4"
    )
    assert built.returncode == 0, built.stderr
    info = _cli("info", "--engine", str(engine), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert (data["backend"], data["precision"], data["max_batch"]) == ("onnxruntime", "fp32", 16)
    assert data["status"].startswith("ok")


def test_cli_set_preprocess_changes_only_the_preprocessing_metadata(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "letterbox.onnx"
    result = _cli("set-preprocess", "--onnx", str(onnx_path), "--preprocess", "letterbox", "--out", str(out))
    assert result.returncode == 0, result.stderr
    before, after = onnx.load(str(onnx_path)), onnx.load(str(out))
    assert before.graph.SerializeToString() == after.graph.SerializeToString()
    meta_before = {p.key: p.value for p in before.metadata_props}
    meta_after = {p.key: p.value for p in after.metadata_props}
    changed = {k for k in meta_before.keys() | meta_after.keys() if meta_before.get(k) != meta_after.get(k)}
    assert changed <= {"resize", "crop_fraction"}
    assert PreprocessSpec.from_metadata(meta_after).describe() == "letterbox"
    # An engine built from it serves the new mode (the sidecar carries it).
    engine = tmp_path / "e.onnx"
    assert _cli("build", "--onnx", str(out), "--out", str(engine), "--quiet").returncode == 0
    assert read_sidecar(engine).spec.describe() == "letterbox"
    assert "letterbox" in _cli("info", "--engine", str(engine)).stdout


def test_cli_bad_preprocess_value_is_one_line(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    result = _cli(
        "set-preprocess", "--onnx", str(onnx_path), "--preprocess", "crop:2", "--out", str(tmp_path / "x")
    )
    _assert_one_line_error(result, "expected crop:FRACTION")
    engine = tmp_path / "e.onnx"
    assert _cli("build", "--onnx", str(onnx_path), "--out", str(engine), "--quiet").returncode == 0
    (tmp_path / "data" / "cat").mkdir(parents=True)
    shutil.copy(sample_photo("chelsea.png"), tmp_path / "data" / "cat")
    args = ("--engine", str(engine), "--data", str(tmp_path / "data"))
    _assert_one_line_error(_cli("evaluate", *args, "--preprocess", "squash"), "expected crop:FRACTION")
    ok = _cli("evaluate", *args, "--preprocess", "stretch")
    assert ok.returncode == 0, ok.stderr
    assert "stretch" in ok.stdout and "published label" in ok.stdout
