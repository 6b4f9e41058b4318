#!/usr/bin/env bash
# Prepare the wheels scripts/gpu_check.sh installs on a GPU machine that has its own torch and Triton but no network:
# everything `import rskip`, the CUDA tests and the benchmark need besides torch (and torch's own requirements), at the
# versions of constraints.txt, for the GPU machine's CPython (3.12 by default; the first argument names another) on
# linux x86_64. Run here, with PyPI reachable:
#
#     scripts/gpu_wheels.sh          # or: scripts/gpu_wheels.sh 3.11
#
# writes .cache/gpu-wheels (about 50 MiB: carry it always), .cache/gpu-wheels-torchvision (7 MiB, the torchvision
# of this environment's torch, which timm imports: carry it where the machine has no torchvision) and
# .cache/gpu-wheels-numpy (16 MiB: carry it where the machine has no numpy). The list below is what a torch-only
# Python needed to import rskip, run tests/test_fused_skip_cuda.py and the benchmark (checked in such a venv);
# optional imports (the Hub CLI's typer/rich, hf-xet, pydantic) are left out to stay under the 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
if ! [[ $python_version =~ ^3\.[0-9]+$ ]]; then
  echo "usage: scripts/gpu_wheels.sh [PYTHON_VERSION]: expected a version such as 3.12, got '$python_version'" >&2
  exit 2
fi
PACKAGES=(
  # rskip's imports and theirs (transformers, timm, accelerate, the Hub client, SentencePiece)
  transformers tokenizers huggingface_hub httpx2 httpcore2 h11 anyio idna truststore safetensors regex PyYAML tqdm
  packaging timm accelerate psutil sentencepiece
  # the benchmark's plot
  matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil pillow
  # the test runner
  pytest pluggy iniconfig pygments
)
pins=()
for package in "${PACKAGES[@]}"; do
  pin=$(grep -i -E "^${package//-/[-_]}==" constraints.txt) || { echo "constraints.txt pins no $package" >&2; exit 1; }
  pins+=("$pin")
done
platform=(--only-binary=:all: --no-deps --python-version "$python_version" --implementation cp
          --abi "cp${python_version/./}" --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .cache/gpu-wheels .cache/gpu-wheels-numpy .cache/gpu-wheels-torchvision
python3 -m pip download --quiet "${platform[@]}" -d .cache/gpu-wheels "${pins[@]}"
python3 -m pip download --quiet "${platform[@]}" -d .cache/gpu-wheels-numpy "$(grep -E '^numpy==' constraints.txt)"
# constraints.txt leaves torch and torchvision to the index: take this environment's pair
torchvision=$(python3 -c "import importlib.metadata as m; print(m.version('torchvision').split('+')[0])" 2>/dev/null) ||
  { echo "python3 here has no torchvision: run this with the project's environment active (. .venv/bin/activate)" >&2
    exit 1; }
python3 -m pip download --quiet "${platform[@]}" -d .cache/gpu-wheels-torchvision "torchvision==$torchvision"
du -sh .cache/gpu-wheels .cache/gpu-wheels-torchvision .cache/gpu-wheels-numpy
