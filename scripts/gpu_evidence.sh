#!/usr/bin/env bash
# The GPU half of the README's results in one go, within --budget_minutes (8 by default) of wall time, installing
# included, on one GPU machine with its own torch, torchvision and numpy and no network (rskip.experiments.gpu_evidence
# says what it runs and how the time is shared):
#   1. CIFAR-10 PreAct-ResNet-110: plain, post_ln, rskip_ln K = 2 and K = 3, up to 3 seeds;
#   2. the depth map at width 256: post_ln, pre_ln, rskip_ln K = 2 at 6+6, 12+12, 24+24 layers, two learning-rate
#      regimes, up to 3 seeds.
#
#     scripts/gpu_evidence_pack.sh                     # here, once: writes .cache/gpu-evidence (about 40 MiB)
#     scripts/gpu_evidence.sh OUTPUT_DIR [--budget_minutes 8] [...]   # there, carrying .cache/gpu-evidence
#
# The carried wheels (exact versions, no index, no dependencies) are installed into a private folder in front of the
# machine's own packages (carried without wheels, the machine's transformers and timm must be in rskip's range);
# CIFAR-10 is carried whole (50,000 images as their JPEG scans). OUTPUT_DIR receives results.md, results.json,
# cifar_top1.png, cifar_training_loss.png, depth_map.png, gpu_evidence.log and logs/ (one log per process). The exit
# status is 2 when what it needs was not carried (one line says what), else the Python part's.
set -uo pipefail
started=$(date +%s.%N)
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: scripts/gpu_evidence.sh OUTPUT_DIR [--budget_minutes M] [--carry FOLDER] [...]" >&2
  exit 2
fi
OUTPUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
CARRY=$REPO/.cache/gpu-evidence
for ((i = 1; i <= $#; i++)); do  # --carry FOLDER (or --carry=FOLDER), if given, is read here too
  case ${!i} in
    --carry) j=$((i + 1)); given=${!j} ;;
    --carry=*) given=${!i#--carry=} ;;
    *) continue ;;
  esac
  CARRY=$(cd "$given" 2>/dev/null && pwd) || CARRY=$given
done
cd "$REPO"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec > >(tee "$OUTPUT_DIR/gpu_evidence.log") 2> >(tee -a "$OUTPUT_DIR/gpu_evidence.log" >&2)

# What was carried, in seconds ----------------------------------------------------------------------------------------
if [ ! -f "$CARRY/manifest.json" ]; then
  echo "gpu_evidence: no $CARRY/manifest.json: run scripts/gpu_evidence_pack.sh where PyPI is reachable and carry" \
       "its folder (.cache/gpu-evidence)" >&2
  exit 2
fi
# rskip from this tree, and the carried wheels (when there are some) in front of the machine's own packages,
# installed into .cache/gpu-evidence-site and kept there for the next run with the same wheels and Python (removing
# them takes seconds that the budget would not see).
SITE=$REPO/.cache/gpu-evidence-site
mkdir -p "$SITE/rskip-path" && ln -sfn "$REPO/modeling" "$SITE/rskip-path/rskip"
export PYTHONPATH="$SITE/rskip-path${PYTHONPATH:+:$PYTHONPATH}"
if [ -f "$CARRY/wheels/requirements.txt" ]; then
  stamp="$(cat "$CARRY/wheels/requirements.txt"; "$PYTHON" -c 'import sys; print(sys.version)')"
  if [ "$stamp" != "$(cat "$SITE/installed" 2>/dev/null)" ]; then
    rm -rf "$SITE/wheels" "$SITE/installed"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/wheels" \
      --find-links "$CARRY/wheels" -r "$CARRY/wheels/requirements.txt" || {
      echo "gpu_evidence: installing the carried wheels failed (above)" >&2; exit 2; }
    echo "$stamp" > "$SITE/installed"
  fi
  export PYTHONPATH="$SITE/rskip-path:$SITE/wheels${PYTHONPATH#"$SITE/rskip-path"}"
fi
"$PYTHON" - "$CARRY/wheels/requirements.txt" <<'PY' || exit 2
# Metadata only (a fraction of a second): the imports themselves happen once, in the runs' fork server.
import importlib.metadata as metadata
import importlib.util
import sys
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit("gpu_evidence: packaging is missing: carry the wheels (scripts/gpu_evidence_pack.sh without --no_wheels)")
import tomllib
carried = Path(sys.argv[1]).read_text().split() if Path(sys.argv[1]).is_file() else []
# rskip's own range for what the models need (pyproject.toml), then each carried wheel at its exact version.
declared = [Requirement(line) for line in tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]]
for requirement in [*(r for r in declared if r.name in ("transformers", "timm")), *map(Requirement, carried)]:
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        installed = None
    if installed is None or installed not in requirement.specifier:
        sys.exit(f"gpu_evidence: {requirement.name} {installed or 'is missing'}"
                 f"{' is outside ' + str(requirement) if installed else ''}: carry the wheels "
                 "(scripts/gpu_evidence_pack.sh without --no_wheels)")
for module in ("torch", "torchvision", "numpy", "PIL"):  # left to the machine: its own match its torch
    if importlib.util.find_spec(module) is None:
        sys.exit(f"gpu_evidence: this machine's Python has no {module}, which the carry leaves to the machine")
if importlib.util.find_spec("rskip") is None:
    sys.exit("gpu_evidence: rskip cannot be found on the path")
PY
echo "installed and checked in $("$PYTHON" -c "import time; print(round(time.time() - $started, 1))") s"

# The experiments -----------------------------------------------------------------------------------------------------
# (--carry last: the absolute path found above wins over a relative one given)
"$PYTHON" -c 'import sys; from rskip.experiments.gpu_evidence import main; main(sys.argv[1:])' \
  "$OUTPUT_DIR" --started "$started" "$@" --carry "$CARRY"
