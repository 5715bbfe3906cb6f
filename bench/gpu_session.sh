#!/usr/bin/env bash
# Everything a GPU session owes: build the CUDA extension, run the GPU tests, then the layer and
# model benchmarks. Logs and JSON go to OUT_DIR (default bench/results), named
# <device>-<what>-<date>. Run from the repository root:
#   MSPLORA_GIT_COMMIT=<sha> bash bench/gpu_session.sh [OUT_DIR] [PHASE...]
# PHASE is build, tests, layers or model (default: all four, in order). A device call is capped
# at 10 minutes, so a slow first build can run alone and the rest in a second call while the
# machine is still warm; every phase after build reinstalls nothing.
set -uo pipefail
OUT_DIR=${1:-bench/results}
shift || true
PHASES=${*:-build tests layers model}
want() { [[ " $PHASES " == *" $1 "* ]]; }
DATE=$(date -u +%F)
PY=${PYTHON:-python3}  # the GPU image has python3 only for sure
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT_DIR"
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
header() {
  echo "# $1: $DEV, commit ${MSPLORA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}, $(date -u +%FT%TZ)"
  $PY -c "import torch, triton; print('# torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# /'
}

if want build; then
  BUILD_LOG="$OUT_DIR/$DEV-build-$DATE.log"
  { header build; nvcc --version | tail -1 | sed 's/^/# /'; start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . 2>&1
    echo "# build seconds: $(( $(date +%s) - start ))"; } > "$BUILD_LOG" 2>&1
  $PY -c "import msplora_kernels as mk; print(mk.available_backends('cuda'))" | tee -a "$BUILD_LOG"
fi

if want tests; then
  { header tests
    $PY -m pytest -v -rs tests/test_gpu.py tests/test_compile.py tests/test_opcheck.py tests/test_dispatch.py 2>&1
  } > "$OUT_DIR/$DEV-tests-$DATE.log"
  tail -3 "$OUT_DIR/$DEV-tests-$DATE.log"
fi

if want layers; then
  LOG="$OUT_DIR/$DEV-$DATE.log"
  # --predict: the cost model's ratios from this GPU's measured ceilings, beside the measurement
  # (and in the JSON's metadata), which is what the cost model's predictions are held against.
  $PY bench/throughput.py --predict --json "$OUT_DIR/$DEV-$DATE.json" --plot "$OUT_DIR/$DEV-$DATE.png" > "$LOG" 2>&1
  tail -14 "$LOG"
  # Into the same log (the device tool returns 8 files at most): CUDA-graph replays, whose gap to
  # the eager run is CPU launch overhead, a tiny layer, where that overhead is all there is, and
  # the opt-in one-pass Triton forward on the small-width case.
  { echo; echo "# --cuda-graphs"; $PY bench/throughput.py --cuda-graphs
    echo; echo "# launch overhead: tiny layer, 16 tokens"; $PY bench/throughput.py --cases tiny --tokens 16
    # The one-pass forward recomputes the mask in every column tile, so it is timed with and
    # without dropout, next to the two-kernel forward in the same conditions.
    for mode in split onepass; do
      for p in 0.05 0; do
        echo; echo "# MSPLORA_TRITON_FORWARD=$mode, dropout $p"
        MSPLORA_TRITON_FORWARD=$mode $PY bench/throughput.py --cases roberta-base --methods linear msplora --dropout $p
      done
    done
    # The triton backend's frozen GEMMs fused in Triton or on cuBLAS (auto, the default, times
    # both per shape bucket; its choices are in the JSON's triton_gemm_choices).
    for mode in fused cublas; do
      echo; echo "# MSPLORA_TRITON_GEMM=$mode"
      MSPLORA_TRITON_GEMM=$mode $PY bench/throughput.py --methods linear msplora
    done
    # The cuda backend's rank-R products on our CUDA-core kernels against cuBLAS plus a mask
    # kernel (the default switches at R > 64; msplora_cuda.cpp has the prediction).
    for mode in kernels cublas; do
      echo; echo "# MSPLORA_CUDA_SKINNY=$mode"
      MSPLORA_CUDA_SKINNY=$mode $PY bench/throughput.py --methods linear msplora_naive msplora
    done
  } >> "$LOG" 2>&1
  tail -24 "$LOG"
fi

if want model; then
  $PY bench/throughput.py --model --json "$OUT_DIR/$DEV-model-$DATE.json" --plot "$OUT_DIR/$DEV-model-$DATE.png" \
    > "$OUT_DIR/$DEV-model-$DATE.log" 2>&1
  tail -8 "$OUT_DIR/$DEV-model-$DATE.log"
fi
