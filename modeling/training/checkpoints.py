"""Resumable training state: where a run stands (`RunState`), atomic writes, and the checkpoints of a run.

A checkpoint is an `Accelerator.save_state` folder plus the run's `run_state.json`, written all at once::

    <output_dir>/checkpoints/step_<N>/  model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl
                                        run_state.json  {"step", "epoch", "batches_in_epoch", "best", "history", "config"}
                                        ...and what the task adds (translation: tokenizer/)

Every checkpoint ends with `manifest.json`, the size and SHA-256 of each of its files, written last: a checkpoint is
complete and intact when its files match it. `--resume_from_checkpoint latest` takes the newest intact checkpoint of
the same run (written with the same settings), saying which it skipped and why.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from accelerate import Accelerator

from .errors import TrainingError

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
MANIFEST = "manifest.json"
BEST_SCORES = "validation_scores.json"
BEST_MODEL = "best_model"
# What a run writes into its output folder besides the best model's files (copied from best_model/).
RUN_ARTEFACTS = (CHECKPOINTS, BEST_MODEL, "tokenizer", "logs", "results.json", "README.md", "validation_curves.png",
                 "predictions_validation.txt", "predictions_test.txt")


def settings_to_check(settings: dict, may_change: set[str], **extra) -> dict:
    """The settings a checkpoint must share with the run that resumes it: every setting except `may_change`
    (output paths, logging, evaluation cadence...), plus `extra` facts such as the number of processes."""
    config = {name: value for name, value in sorted(settings.items()) if name not in may_change}
    return json.loads(json.dumps({**config, **extra}, default=str))


@dataclasses.dataclass
class RunState:
    """Where a run stands, saved as each checkpoint's run_state.json: the optimizer updates done, the data position
    (epoch, batches of it done), the best validation scores so far with their "step", the validation history (one
    record per validation, with its "step"), the settings a resume must share, and the training time so far."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best: dict | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)
    # Seconds of training up to this checkpoint, earlier sittings included: a resumed run reports its whole time.
    train_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | None, config: dict) -> "RunState":
        """The state saved in `checkpoint`, after checking that it was written with `config`; a new run's when
        `checkpoint` is None."""
        if checkpoint is None:
            return cls(config=config)
        saved = read_run_state(checkpoint)
        differences = config_differences(saved.get("config", {}), config)
        if differences:
            raise TrainingError(
                f"checkpoint {checkpoint} belongs to another configuration; resume it with the settings it was "
                f"written with, or start a new run. Differences:\n  " + "\n  ".join(differences)
            )
        return cls(**saved)


def read_run_state(checkpoint: Path) -> dict:
    """A checkpoint's run_state.json; `TrainingError` naming the file if it cannot be read."""
    path = checkpoint / RUN_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot read {path}: {type(error).__name__}: {error}") from error


def config_differences(saved: dict, config: dict) -> list[str]:
    """The settings that differ between a checkpoint's `saved` configuration and `config`, one line each."""
    return [f"{name}: {saved.get(name, '<unset>')!r} in the checkpoint, {config.get(name, '<unset>')!r} now"
            for name in sorted(set(saved) | set(config)) if saved.get(name) != config.get(name)]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file of `folder` in its manifest.json (the checkpoint's last file)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)
    write_json(folder / MANIFEST, {str(path.relative_to(folder)): {"size": path.stat().st_size,
                                                                  "sha256": file_digest(path)} for path in files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (no manifest, a file missing, truncated or changed), or None."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return f"it has no {MANIFEST} (it was interrupted while being written, or written by an older rskip)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        return f"its {MANIFEST} cannot be read ({error})"
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, {expected['size']} when it was written (truncated?)"
        if file_digest(path) != expected["sha256"]:
            return f"{path} differs from the file written (its SHA-256 does not match {MANIFEST})"
    return None


def write_json(path: str | Path, data) -> None:
    """Write `data` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


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


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: RunState,
                    keep_last: int | None = None, save_extra: Callable[[Path], None] | None = None) -> Path:
    """Save model, optimizer, scheduler and RNG states (`Accelerator.save_state`) and `state` to
    `output_dir/checkpoints/step_<step>`, atomically. `save_extra(folder)` runs on the main process to add files
    (a tokenizer...). Keeps the `keep_last` newest checkpoints when set."""
    path = Path(output_dir) / CHECKPOINTS / f"step_{state.step}"
    with atomic_directory(accelerator, path) as temporary:
        accelerator.save_state(temporary)
        accelerator.wait_for_everyone()  # every process's files are in, before the manifest lists them
        if accelerator.is_main_process:
            if save_extra is not None:
                save_extra(temporary)
            write_json(temporary / RUN_STATE, dataclasses.asdict(state))
            write_manifest(temporary)
    if accelerator.is_main_process and keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def find_checkpoint(output_dir: str | Path, resume_from: str | None, config: dict, report=print) -> Path | None:
    """Resolve `--resume_from_checkpoint` on this file system (`hub[@revision]` is resolved first by
    `rskip.training.hub.resolve_hub_checkpoint`). `latest` is the newest intact checkpoint of `output_dir` written with
    `config` (None when there is none, so a preemptible job can always pass it); each one passed over is reported
    with the reason. Anything else must be an intact checkpoint folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        for checkpoint in reversed(list_checkpoints(output_dir)):
            try:
                other_run = config_differences(read_run_state(checkpoint).get("config", {}), config)
            except TrainingError as error:
                report(f"Skipping checkpoint {checkpoint}: {error}")
                continue
            if other_run:
                continue  # another run's: `check_output_dir` decides whether the folder may be reused
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            report(f"Skipping checkpoint {checkpoint}: {problem}")
        return None
    path = Path(resume_from)
    if not path.is_dir():
        raise TrainingError(f"--resume_from_checkpoint {path}: no such folder")
    if not (path / RUN_STATE).is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {path} is not a checkpoint of this project (it has no {RUN_STATE}); "
            f"checkpoints are the folders {CHECKPOINTS}/step_<N> inside a run's output folder"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"--resume_from_checkpoint {path} cannot be resumed from: {problem}")
    return path


def check_output_dir(output_dir: str | Path, checkpoint: Path | None, config: dict, overwrite: bool) -> None:
    """Refuse to start a new run (`checkpoint` None) in a folder that holds another one (a finished run's
    results.json, or checkpoints of other settings) unless `overwrite`, which then deletes that run's files."""
    output_dir = Path(output_dir)
    if checkpoint is not None or not output_dir.is_dir():
        return
    finished = (output_dir / "results.json").is_file()
    checkpoints = list_checkpoints(output_dir)
    if not (finished or checkpoints):
        return  # empty, or the leftovers of a run stopped before its first checkpoint: replaced as it goes
    if not overwrite:
        found = "a finished run (results.json)" if finished else f"{len(checkpoints)} checkpoints of another run"
        differences = []
        if checkpoints:
            with contextlib.suppress(TrainingError):
                differences = config_differences(read_run_state(checkpoints[-1]).get("config", {}), config)
        raise TrainingError(
            f"--output_dir {output_dir} holds {found}; pass --overwrite_output_dir to replace it, "
            f"--resume_from_checkpoint to continue it, or choose another folder"
            + ("; its settings differ from this run's:\n  " + "\n  ".join(differences) if differences else ""))
    best_files = [path.name for path in (output_dir / BEST_MODEL).iterdir()] if (output_dir / BEST_MODEL).is_dir() else []
    for name in (*RUN_ARTEFACTS, *best_files):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resume(accelerator: Accelerator, checkpoint: Path, state: RunState, best_dir: Path) -> None:
    """Load the weights, optimizer, schedule and RNG states of `checkpoint` (`state` holds the rest). When `best_dir`
    does not hold the checkpoint's best model (the run stopped between a new best and its checkpoint, or resumes into
    another folder), the best is tracked anew."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # noqa: BLE001 -- any failure to load is the checkpoint's, named as such
        raise TrainingError(f"cannot resume from {checkpoint}: {type(error).__name__}: {error}") from error
    accelerator.print(f"Resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, "
                      f"{state.batches_in_epoch} batches into it")
    saved_best = best_dir / BEST_SCORES
    if state.best and (not saved_best.is_file() or json.loads(saved_best.read_text())["step"] != state.best["step"]):
        accelerator.print(f"{best_dir} does not hold the checkpoint's best model (step {state.best['step']}): "
                          f"the best is tracked anew from here")
        state.best = None


def save_best_model(accelerator: Accelerator, model, best_dir: Path, best: dict, processor=None,
                    files: dict[str, str] | None = None) -> None:
    """Save the new best model to `best_dir` as a Hub-ready folder, atomically: `save_pretrained` (config, weights,
    custom code), `processor.save_pretrained` (a tokenizer...) and `files` (name: text); then its scores `best`
    (with their "step") as validation_scores.json, which `resume` checks."""
    with atomic_directory(accelerator, best_dir) as temporary:
        state_dict = accelerator.get_state_dict(model)
        accelerator.unwrap_model(model).save_pretrained(temporary, state_dict=state_dict,
                                                        is_main_process=accelerator.is_main_process,
                                                        save_function=accelerator.save)
        if accelerator.is_main_process:
            if processor is not None:
                processor.save_pretrained(temporary)
            for name, text in (files or {}).items():
                (temporary / name).write_text(text)
    if accelerator.is_main_process:
        write_json(best_dir / BEST_SCORES, best)


__all__ = [
    "CHECKPOINTS",
    "RUN_STATE",
    "MANIFEST",
    "BEST_SCORES",
    "BEST_MODEL",
    "settings_to_check",
    "RunState",
    "write_json",
    "atomic_directory",
    "list_checkpoints",
    "save_checkpoint",
    "checkpoint_problem",
    "find_checkpoint",
    "check_output_dir",
    "resume",
    "save_best_model",
]
