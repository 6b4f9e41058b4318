"""Run bookkeeping shared by this project's Accelerate training scripts (translation, image classification).

Nothing here knows about the task: checkpoints are `Accelerator.save_state` folders plus a
`run_state.json`, written atomically; a resume checks that the checkpoint belongs to the same
configuration; results are JSON; curves are PNG. A script raises `TrainingError` for anything
the user must fix, and `run_main` turns it into a one-line message.

Checkpoint layout (under the run's output folder)::

    checkpoints/step_<N>/   model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl  (Accelerate)
                            run_state.json   {"step", "config", ...whatever the script keeps}
"""

import contextlib
import itertools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"


class TrainingError(Exception):
    """A problem the user must fix (bad input, a wrong checkpoint, a diverged run), reported as one message."""


def run_main(main: Callable[[], object]) -> None:
    """Call `main()`; a `TrainingError` exits with status 1 and `error: <message>` instead of a traceback."""
    try:
        main()
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def grouped(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter): the micro-batches of each optimizer update."""
    iterator = iter(iterable)
    while group := list(itertools.islice(iterator, size)):
        yield group


def run_config(args, may_change: set[str], **extra) -> dict:
    """The settings a checkpoint must share with the run that resumes it: every argument except `may_change`
    (output paths, logging, evaluation cadence...), plus `extra` facts such as the number of processes."""
    config = {name: value for name, value in sorted(vars(args).items()) if name not in may_change}
    return json.loads(json.dumps({**config, **extra}, default=str))


@contextlib.contextmanager
def atomic_directory(accelerator: Accelerator, path: str | Path) -> Iterator[Path]:
    """Write a folder all at once: every process writes into a temporary sibling, which the main process
    then renames to `path` (replacing an older one). An interruption leaves `path` as it was.

    Needs a file system shared by all processes, as `Accelerator.save_state` does."""
    path = Path(path)
    temporary, previous = path.with_name(f".tmp-{path.name}"), path.with_name(f".old-{path.name}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    yield temporary
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():
            path.rename(previous)
        temporary.rename(path)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    found = [path for path in folder.glob("step_*") if (path / RUN_STATE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda path: int(path.name.removeprefix("step_")))


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, run_state: dict,
                    keep_last: int | None = None, save_extra: Callable[[Path], None] | None = None) -> Path:
    """Save model, optimizer, scheduler and RNG states (`Accelerator.save_state`) and `run_state` (must hold
    "step") to `output_dir/checkpoints/step_<step>`, atomically. `save_extra(folder)` runs on the main process
    to add files (a tokenizer...). Keeps the `keep_last` newest checkpoints when set."""
    path = Path(output_dir) / CHECKPOINTS / f"step_{run_state['step']}"
    with atomic_directory(accelerator, path) as temporary:
        accelerator.save_state(temporary)
        if accelerator.is_main_process:
            if save_extra is not None:
                save_extra(temporary)
            write_json(temporary / RUN_STATE, run_state)
    if accelerator.is_main_process and keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def find_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """Resolve `--resume_from_checkpoint`: `latest` is the newest checkpoint of `output_dir` (None when there is
    none yet, so a preemptible job can always pass it); anything else must be a checkpoint folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise TrainingError(f"--resume_from_checkpoint {path}: no such folder")
    if not (path / RUN_STATE).is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {path} is not a checkpoint of this project (it has no {RUN_STATE}); "
            f"checkpoints are the folders {CHECKPOINTS}/step_<N> inside a run's output folder"
        )
    return path


def read_run_state(path: str | Path, config: dict) -> dict:
    """The `run_state` saved in checkpoint `path`, after checking that it was written with `config`."""
    path = Path(path)
    state = json.loads((path / RUN_STATE).read_text())
    saved = state.get("config", {})
    differences = [
        f"{name}: {saved.get(name, '<unset>')!r} in the checkpoint, {config.get(name, '<unset>')!r} now"
        for name in sorted(set(saved) | set(config)) if saved.get(name) != config.get(name)
    ]
    if differences:
        raise TrainingError(
            f"checkpoint {path} belongs to another configuration; resume it with the settings it was written "
            f"with, or start a new run. Differences:\n  " + "\n  ".join(differences)
        )
    return state


def check_finite_loss(loss: float, step: int, output_dir: str | Path) -> None:
    """Stop a diverged run: a non-finite `loss` at optimizer step `step` raises `TrainingError`, naming the last
    good checkpoint, which is left untouched (nothing is saved after the failure)."""
    if math.isfinite(loss):
        return
    checkpoints = list_checkpoints(output_dir)
    last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "there is no checkpoint yet"
    raise TrainingError(
        f"the training loss is {loss} at step {step}; training stopped before updating the weights and saved "
        f"nothing more ({last}). Try a lower --learning_rate, a longer warmup or gradient clipping."
    )


def init_tracking(accelerator: Accelerator, project_name: str, config: dict) -> None:
    """Start the trackers chosen by `Accelerator(log_with=...)`, with the run's configuration as hyperparameters
    (converted to the scalar types TensorBoard accepts)."""
    hyperparameters = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                       for key, value in config.items()}
    accelerator.init_trackers(project_name, config=hyperparameters)


def write_json(path: str | Path, data) -> None:
    """Write `data` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


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


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None,
                ignore_patterns: list[str] | None = None, commit_message: str = "Upload trained model") -> str:
    """Create the Hub repository `repo_id` if needed and upload `folder` (minus `ignore_patterns`); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=ignore_patterns,
                      commit_message=commit_message)
    return str(url)


__all__ = [
    "TrainingError",
    "run_main",
    "grouped",
    "run_config",
    "atomic_directory",
    "list_checkpoints",
    "save_checkpoint",
    "find_checkpoint",
    "read_run_state",
    "check_finite_loss",
    "init_tracking",
    "write_json",
    "plot_curves",
    "push_to_hub",
]
