#!/usr/bin/env bash
# The GPU check of the fused rSkip+LN op, in one go (about 8 minutes on one H100/H200):
#   1. installs the wheels prepared by scripts/gpu_wheels.sh (exact versions, --no-deps, no index) and rskip itself;
#   2. prints the versions and the GPU;
#   3. runs the `cuda` tests (tests/test_fused_skip_cuda.py) with the Triton kernels;
#   4. runs the CUDA benchmark with the kernels selected (RSKIP_TRITON=1): the op alone against the eager and compiled
#      loop, transformer-base (6+6, d 512) bf16 and ResNet-50 bf16 channels-last at 224 px.
#
#     scripts/gpu_check.sh OUTPUT_DIR
#
# The caller carries .cache/gpu-wheels with the working tree, and .cache/gpu-wheels-torchvision and
# .cache/gpu-wheels-numpy where the machine lacks torchvision or numpy (the script says so and stops at once). OUTPUT_DIR receives environment.txt, tests.log, benchmark-*.log, and per benchmark benchmark.json,
# benchmark.csv, benchmark.png and benchmark_op.png. The exit status is the tests'; benchmark failures are logged.
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh OUTPUT_DIR   (carry .cache/gpu-wheels, built by scripts/gpu_wheels.sh)" >&2
  exit 2
fi
OUTPUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
cd "$REPO"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS, for the bit-exact resume test
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }

# 1. Dependencies -----------------------------------------------------------------------------------------------------
if [ ! -d .cache/gpu-wheels ]; then
  echo "no .cache/gpu-wheels here: run scripts/gpu_wheels.sh where PyPI is reachable and carry the folder" >&2
  exit 2
fi
for module in numpy torchvision; do  # installed only where missing: the machine's own match its torch
  if ! "$PYTHON" -c "import $module" 2>/dev/null; then
    if [ ! -d ".cache/gpu-wheels-$module" ]; then
      echo "this machine has no $module: carry .cache/gpu-wheels-$module as well (scripts/gpu_wheels.sh)" >&2
      exit 2
    fi
    "$PYTHON" -m pip install --quiet --no-deps --no-index .cache/gpu-wheels-"$module"/*.whl
  fi
done
"$PYTHON" -m pip install --quiet --no-deps --no-index .cache/gpu-wheels/*.whl
# rskip as a wheel built from this tree; where setuptools is missing, the package folder on PYTHONPATH instead
if "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$OUTPUT_DIR/wheel" . 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$OUTPUT_DIR"/wheel/rskip-*.whl
else
  mkdir -p "$OUTPUT_DIR/pythonpath" && ln -sfn "$REPO/modeling" "$OUTPUT_DIR/pythonpath/rskip"
  export PYTHONPATH="$OUTPUT_DIR/pythonpath${PYTHONPATH:+:$PYTHONPATH}"
  echo "setuptools missing: rskip imported from $REPO/modeling"
fi
echo "installed in $(elapsed)"

# 2. Versions and the GPU ---------------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  "$PYTHON" - <<'PY'
import platform, sys
import torch, torchvision, triton, transformers, timm, rskip
print(f"torchvision {torchvision.__version__}")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
      f"{triton.__version__}, transformers {transformers.__version__}, timm {timm.__version__}")
print("rskip from", rskip.__file__)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} multiprocessors, "
      f"compute capability {p.major}.{p.minor}")
PY
} > "$OUTPUT_DIR/environment.txt" 2>&1
environment_status=$?
cat "$OUTPUT_DIR/environment.txt"
[ "$environment_status" -eq 0 ] || { echo "the environment check failed (see above)" >&2; exit 2; }

# 3. The cuda tests ---------------------------------------------------------------------------------------------------
"$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/test_fused_skip_cuda.py 2>&1 | tee "$OUTPUT_DIR/tests.log"
tests_status=${PIPESTATUS[0]}
echo "tests: exit $tests_status after $(elapsed)"

# 4. The CUDA benchmark, kernels selected ----------------------------------------------------------------------------
benchmark() {  # name, flags...
  local name=$1; shift
  RSKIP_TRITON=1 "$PYTHON" -c 'import sys; from rskip.commands.benchmark import main; main(sys.argv[1:])' \
    --output_dir "$OUTPUT_DIR/$name" --rounds 3 --min_run_time 0.2 "$@" 2>&1 | tee "$OUTPUT_DIR/benchmark-$name.log"
  echo "benchmark $name: exit ${PIPESTATUS[0]} after $(elapsed)"
}
benchmark op --op only
benchmark marian-base --op off --family marian --preset base --batch_size 64 --seq_len 64
benchmark resnet50 --op off --family resnet --image_model resnet50 --batch_size 64 --image_size 224 --channels_last
echo "gpu check done in $(elapsed); results in $OUTPUT_DIR"
exit "$tests_status"
