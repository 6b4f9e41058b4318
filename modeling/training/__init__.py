"""rskip.training: train the models of this package with Accelerate, on one process, many GPUs or many machines.

    from rskip.training import TrainingConfig, train
    from rskip.training.cli import parse_translation_args
    from rskip.training.translation import TranslationTask

    args = parse_translation_args(["--train_file", "data/train", "--validation_file", "data/val", ...])
    results = train(TranslationTask(args), TrainingConfig.from_args(args), command="...")

One module per concern:

- `loop`: `train`, the run both tasks share (accelerator → data → model → optimizer → prepare → resume → loop →
  best model → output folder), its typed `TrainingConfig`, and `TrainingTask`, the parts a task passes in.
- `translation`, `image_classification`: each task's data pipeline, samplers, model building, evaluation and task.
- `checkpoints`: run state, atomic writes, finding and resuming checkpoints, the best model.
- `reporting`: results.json, hardware, curves, the output folder; `model_card`: model cards.
- `hub`: the Hub: start-up checks, uploads during training (`--hub_strategy`), resuming from `last-checkpoint/`,
  pushing a finished run (`rskip-push-to-hub`), timm's format for image models.
- `cli`: the training commands' command lines, checked at parsing; `data`: reading local data files.
- `signals`: SIGTERM and SIGINT stop a run after the current update, with a checkpoint.
- `errors`: `TrainingError`, and raising it on every process when one process fails.
- `translation_scores`: BLEU and chrF as an `evaluate` metric module.

The model files of the package never import this subpackage, so saved model folders stay free of it.
"""

from .errors import TrainingDiverged, TrainingError
from .loop import TrainingConfig, TrainingTask, train

__all__ = ["TrainingDiverged", "TrainingError", "TrainingConfig", "TrainingTask", "train"]
