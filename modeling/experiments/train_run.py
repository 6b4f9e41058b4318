"""One run of an experiment grid, as `rskip.experiments.runner` starts it in its own process:

    python -m rskip.experiments.train_run translation|image_classification FLAGS...

FLAGS are the training command's (`rskip-train-translation`, `rskip-train-image-classification`). A run whose
training loss becomes non-finite writes diverged.json in its --output_dir and exits 0: for an experiment that is an
outcome, not a failure. Any other error exits 1 with one `error:` line, as the training commands do.
"""

import json
import os
import sys
from pathlib import Path

import torch

from ..commands import train_image_classification, train_translation
from ..training.cli import command_line, run_main
from ..training.errors import TrainingDiverged

TASKS = {"translation": (train_translation.main, "rskip-train-translation"),
         "image_classification": (train_image_classification.main, "rskip-train-image-classification")}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TASKS:
        raise SystemExit(f"usage: python -m rskip.experiments.train_run {{{','.join(TASKS)}}} FLAGS...")
    (train, command), flags = TASKS[argv[0]], argv[1:]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        return train(flags)
    except TrainingDiverged as diverged:
        record = {"diverged": str(diverged), "step": diverged.step, "loss": repr(diverged.loss),
                  "command": command_line(command, flags)}
        output_dir = Path(flags[flags.index("--output_dir") + 1])
        partial = output_dir / "diverged.json.partial"
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(output_dir / "diverged.json")  # atomic: a run is finished once the marker exists
        print(f"diverged: {diverged}")
        return record


if __name__ == "__main__":
    run_main(main)
