#!/usr/bin/env bash
# Prepare, here, what scripts/gpu_evidence.sh needs on a GPU machine without network (rskip.experiments.
# gpu_evidence_pack): CIFAR-10 as its JPEG scans, the number task as token ids, and the exact wheels of what
# `import rskip` needs besides torch, torchvision and numpy. About 40 MiB in .cache/gpu-evidence; carry that folder.
#
#     scripts/gpu_evidence_pack.sh [--output_dir .cache/gpu-evidence] [--no_wheels]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" -m rskip.experiments.gpu_evidence_pack "$@"
