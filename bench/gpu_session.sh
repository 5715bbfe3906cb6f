#!/usr/bin/env bash
# Everything a GPU session owes, in one command: build the CUDA extension, run the GPU tests,
# then the layer and model benchmarks. Logs and JSON go to OUT_DIR (default bench/results),
# named <device>-<what>-<date>. Run from the repository root:
#   MSPLORA_GIT_COMMIT=<sha> bash bench/gpu_session.sh [OUT_DIR]
set -uo pipefail
OUT_DIR=${1:-bench/results}
DATE=$(date -u +%F)
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT_DIR"
DEV=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
header() {
  echo "# $1: $DEV, commit ${MSPLORA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}, $(date -u +%FT%TZ)"
  python -c "import torch, triton; print('# torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# /'
}

BUILD_LOG="$OUT_DIR/$DEV-build-$DATE.log"
{ header build; start=$(date +%s)
  pip install --no-build-isolation --no-deps -e . 2>&1
  echo "# build seconds: $(( $(date +%s) - start ))"; } > "$BUILD_LOG" 2>&1
python -c "import msplora_kernels as mk; print(mk.available_backends('cuda'))" | tee -a "$BUILD_LOG"

{ header tests
  python -m pytest -v -rs tests/test_gpu.py tests/test_compile.py tests/test_opcheck.py tests/test_dispatch.py 2>&1
} > "$OUT_DIR/$DEV-tests-$DATE.log"
tail -3 "$OUT_DIR/$DEV-tests-$DATE.log"

python bench/throughput.py --json "$OUT_DIR/$DEV-$DATE.json" --plot "$OUT_DIR/$DEV-$DATE.png" \
  > "$OUT_DIR/$DEV-$DATE.log" 2>&1
tail -14 "$OUT_DIR/$DEV-$DATE.log"
python bench/throughput.py --model --json "$OUT_DIR/$DEV-model-$DATE.json" > "$OUT_DIR/$DEV-model-$DATE.log" 2>&1
tail -8 "$OUT_DIR/$DEV-model-$DATE.log"
