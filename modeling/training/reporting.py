"""What a finished run leaves behind: results.json, the validation curves, the model card, the hardware it took (the
upload to the Hub is `hub`'s). Also the trackers' hyperparameters.

The output folder ends up Hub-ready::

    <output_dir>/  the best model's files (save_pretrained: config, weights, custom code; the task's processor...)
                   results.json, validation_curves.png, README.md (the model card)
                   best_model/   the best model so far, with validation_scores.json (training state, not uploaded)
                   checkpoints/  resumable training states (not uploaded)
"""

import os
import platform
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoints import BEST_SCORES, write_json
from .errors import TrainingError
from .model_card import write_model_card

# Settings whose values are secrets: recorded as None.
SECRET_SETTINGS = ("hub_token",)


def public_settings(settings: dict) -> dict:
    """The run's settings as results.json and the trackers record them: secrets left out."""
    return {key: None if key in SECRET_SETTINGS else value for key, value in settings.items()}


def init_tracking(accelerator: Accelerator, project_name: str, settings: dict) -> None:
    """Start the trackers chosen by `Accelerator(log_with=...)`, with the run's settings (secrets left out) as
    hyperparameters, converted to the scalar types TensorBoard accepts."""
    hyperparameters = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                       for key, value in public_settings(settings).items() if value is not None}
    accelerator.init_trackers(project_name, config=hyperparameters)


def describe_hardware(accelerator: Accelerator) -> str:
    """The devices a run trained on, e.g. "2 processes on NVIDIA H100 80GB HBM3" or "1 process on 2 CPU cores
    (x86_64), 2 threads"."""
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    if accelerator.device.type == "cuda":
        return f"{processes} on {torch.cuda.get_device_name(accelerator.device)}"
    if accelerator.device.type != "cpu":
        return f"{processes} on {accelerator.device.type}"
    threads = f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
    return f"{processes} on {os.cpu_count()} CPU cores ({platform.machine()}), {threads} each"


def run_results(accelerator: Accelerator, model, state, settings: dict, runtime: float, command: str) -> dict:
    """What results.json says of a finished run besides the task's own: the parameter count, the best validation
    scores and their step, the number of updates, the training time and the hardware it took, the validation history,
    the settings (secrets left out) and the command."""
    return {
        "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "best_step": state.best["step"],
        "validation": {key: value for key, value in state.best.items() if key != "step"},
        "steps": state.step,
        "train_runtime_s": round(runtime, 1),
        "hardware": describe_hardware(accelerator),
        "history": state.history,
        "args": public_settings(settings),
        "command": command,
    }


def plot_curves(histories: dict[str, list[dict]], metrics: list[str], path: str | Path, x: str = "step") -> Path:
    """One panel per metric, one line per run: `histories` maps a run's label to its list of records
    (dicts holding `x` and some of `metrics`). Saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for label, records in histories.items():
            points = [(record[x], record[metric]) for record in records if record.get(metric) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=label)
        axis.set_xlabel(x)
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


class ModelCardError(TrainingError):
    """A finished run's model card could not be written; its model and results were."""


def finish_output(accelerator: Accelerator, output_dir: str | Path, best_dir: Path, results: dict, curves: list[str],
                  label: str) -> str | None:
    """Make `output_dir` the Hub-ready model folder, on the main process (`write_model_folder`). Returns what could
    not be written (a `ModelCardError`'s message), for the run to report once everything else is done, or None."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            write_model_folder(output_dir, best_dir, results, curves, label)
        except ModelCardError as error:
            return str(error)
    return None


def write_model_folder(folder: str | Path, best_dir: Path, results: dict, curves: list[str], label: str,
                       repo_id: str | None = None) -> None:
    """Write into `folder` the files of `best_dir` (not its scores), validation_curves.png (the `curves` metrics of
    results' history, labelled `label`), the model card (for `repo_id`) and, last, results.json, which marks the run
    finished. A card that cannot be written does not cost the run: results.json is still written, then a
    `ModelCardError` names the command that writes the card."""
    folder = Path(folder)
    for path in best_dir.iterdir():
        if path.name != BEST_SCORES:
            (folder / path.name).write_bytes(path.read_bytes())
    plot_curves({label: results["history"]}, curves, folder / "validation_curves.png")
    card_error = None
    try:
        write_model_card(folder, repo_id=repo_id, results=results)
    except Exception as error:  # noqa: BLE001  (whatever broke the card, the weights and results must be kept)
        card_error = ModelCardError(
            f"the run finished, but writing its model card {folder / 'README.md'} failed ({type(error).__name__}: "
            f"{error}); the model, results.json and checkpoints are saved: write the card with "
            f"`rskip-model-card {folder}`")
    write_json(folder / "results.json", results)
    if card_error is not None:
        raise card_error


__all__ = [
    "public_settings",
    "init_tracking",
    "describe_hardware",
    "run_results",
    "plot_curves",
    "finish_output",
    "ModelCardError",
    "write_model_folder",
]
