#!/usr/bin/env bash
# Entrypoint of the GPU image: make sure the engine cache holds a TensorRT engine built for
# THIS GPU model and THIS TensorRT version, then exec `stream-worker "$@"`.
#
# A TensorRT plan only loads on the GPU model and TensorRT version that built it. The engine
# sidecar records both, and stream_worker.backends.registry.verify_engine checks them (and the
# engine's and the ONNX model's sha256); the engine is (re)built only when that check fails.
# Engines live under $LOOKOUT_CACHE_DIR/engines/<gpu model>/trt-<version>/, so pods on different
# GPU models can share one cache volume, and a lock keeps pods that start together from
# building the same engine twice.
#
# Variables (besides the worker's own settings, see `stream-worker run --help`):
#   LOOKOUT_ENGINE         an engine file to use as is: nothing is built (the worker still verifies it)
#   LOOKOUT_TRT_PRECISION  fp16 (default) or fp32; int8 needs calibration images: build it
#                          with `engine-build build --backend tensorrt --precision int8 --calib DIR`
#                          and pass it as LOOKOUT_ENGINE
#   LOOKOUT_MAX_BATCH      the worker's largest batch (default 16), also the engine's largest batch
set -euo pipefail

if [[ "${1:-run}" == "run" && -z "${LOOKOUT_ENGINE:-}" ]]; then
    cache_dir="${LOOKOUT_CACHE_DIR:?LOOKOUT_CACHE_DIR must name the engine cache volume}"
    precision="${LOOKOUT_TRT_PRECISION:-fp16}"
    max_batch="${LOOKOUT_MAX_BATCH:-16}"
    opt_batch=$(( max_batch < 8 ? max_batch : 8 ))
    case "$precision" in
        fp16 | fp32) ;;
        *) echo "lookout-gpu: LOOKOUT_TRT_PRECISION must be fp16 or fp32, not '$precision'" >&2; exit 2 ;;
    esac
    cache_key="$(python3 -c '
import re
from stream_worker.backends.tensorrt import runtime_version_and_gpu
version, gpu = runtime_version_and_gpu()
print(re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") + "/trt-" + version)')"
    engine="${cache_dir}/engines/${cache_key}/efficientnet_lite0-tensorrt-${precision}-b${max_batch}.plan"
    mkdir -p "$(dirname "$engine")"
    (
        flock 9
        if python3 -c 'import sys, pathlib
from stream_worker.backends.registry import verify_engine
verify_engine(pathlib.Path(sys.argv[1]))' "$engine" 2>/dev/null; then
            echo "lookout-gpu: using cached engine $engine" >&2
        else
            echo "lookout-gpu: building $engine for this GPU (cache key $cache_key)" >&2
            engine-build build --backend tensorrt --precision "$precision" --quiet \
                --opt-batch "$opt_batch" --max-batch "$max_batch" --out "$engine"
        fi
    ) 9>"${engine}.lock"
    export LOOKOUT_ENGINE="$engine"
fi

exec stream-worker "$@"
