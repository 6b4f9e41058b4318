"""What this project's training scripts share. The Accelerate scripts (translation, image classification): the
output and logging flags, the Accelerator, the training loop, checkpoints and resumes, the best model and the output
folder. The Trainer examples: the split of their command line.

Nothing here knows about the task: a script brings its data, model, loss per batch, validation (metrics and the
rule for a new best) and the files it adds, and calls `train_loop`. Checkpoints are `Accelerator.save_state` folders
plus the run's `RunState`, written atomically; a resume checks that the checkpoint belongs to the same
configuration; results are JSON; curves are PNG. A script raises `TrainingError` for anything the user must fix,
and `run_main` turns it into a one-line message.

Layout of the run's output folder::

    checkpoints/step_<N>/   model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl  (Accelerate)
                            run_state.json   {"step", "epoch", "batches_in_epoch", "best", "history", "config"}
                            ...and what the script adds (translation: tokenizer/)
    best_model/             the best model so far (save_pretrained, plus the script's files), validation_scores.json
    results.json, validation_curves.png, README.md (the model card, `model_card.py`) and best_model's files (not
    its scores): the Hub-ready model folder
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from model_card import write_model_card

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
BEST_MODEL = "best_model"
BEST_SCORES = "validation_scores.json"
# The upload to the Hub leaves out the training state and unfinished folders.
IGNORED_BY_HUB = [f"{CHECKPOINTS}/*", f"{BEST_MODEL}/*", ".tmp-*", ".old-*"]


class TrainingError(Exception):
    """A problem the user must fix (bad input, a wrong checkpoint, a diverged run), reported as one message."""


def run_main(main: Callable[[], object]) -> None:
    """Call `main()`; a `TrainingError` exits with status 1 and `error: <message>` instead of a traceback."""
    try:
        main()
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a script's last two groups, read by the functions here: checkpoints and output, logging and the
    Hub."""
    output = parser.add_argument_group("checkpoints and output")
    output.add_argument("--output_dir", required=True)
    output.add_argument("--checkpointing_steps",
                        help="Save a resumable state every N updates, or 'epoch'; and at the end of training.")
    output.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints.")
    output.add_argument("--resume_from_checkpoint",
                        help="A checkpoint folder, or 'latest' (the newest in --output_dir, if any).")

    logging = parser.add_argument_group("logging and the Hub")
    logging.add_argument("--with_tracking", action="store_true")
    logging.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "trackio", "wandb", "all"])
    logging.add_argument("--push_to_hub", action="store_true")
    logging.add_argument("--hub_model_id", help="Defaults to the name of --output_dir.")
    logging.add_argument("--hub_token")


def parse_trainer_args(arguments_class, parse_args: Callable, argv: list[str] | None = None) -> tuple:
    """Split a command line (`sys.argv[1:]` when `argv` is None) between a transformers `TrainingArguments` class,
    which takes its fields, and a training script's `parse_args`, which takes the rest plus the Trainer's
    --output_dir and --seed. Returns both parsed."""
    training_args, rest = HfArgumentParser(arguments_class).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv, return_remaining_strings=True)
    args = parse_args([*rest, "--output_dir", training_args.output_dir, "--seed", str(training_args.seed)])
    return training_args, args


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran `main(argv)`, for results.json and model cards: as typed (`sys.argv`) when `argv` is None,
    else `script` followed by `argv` (a call from Python, as in the tests)."""
    return shlex.join(sys.argv if argv is None else [script, *argv])


def create_accelerator(args) -> Accelerator:
    """The run's `Accelerator` (--mixed_precision; trackers with --with_tracking, logging to <output_dir>/logs), once
    the output folder exists."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The schedule counts optimizer updates, whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def init_tracking(accelerator: Accelerator, project_name: str, config: dict) -> None:
    """Start the trackers chosen by `Accelerator(log_with=...)`, with the run's configuration as hyperparameters
    (converted to the scalar types TensorBoard accepts)."""
    hyperparameters = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                       for key, value in config.items()}
    accelerator.init_trackers(project_name, config=hyperparameters)


def read_data_file(builder: str, path: str | Path, folder: bool = False) -> Dataset:
    """The rows that datasets' `builder` (json, text, parquet, imagefolder...) reads from the file `path`, or from
    every file below the folder `path`. A missing path, or one it cannot read, raises `TrainingError` naming it."""
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise TrainingError(f"{path}: no such {'folder' if folder else 'file'}")
    try:
        return load_dataset(builder, data_files=str(path / "**" if folder else path), split="train")
    except (DatasetGenerationError, OSError, ValueError, EOFError) as error:
        cause = error.__cause__ or error
        raise TrainingError(f"cannot read {path}: {type(cause).__name__}: {cause}") from error


# ------------------------------------------------------------------------------------------ run state, checkpoints

def run_config(args, may_change: set[str], **extra) -> dict:
    """The settings a checkpoint must share with the run that resumes it: every argument except `may_change`
    (output paths, logging, evaluation cadence...), plus `extra` facts such as the number of processes."""
    config = {name: value for name, value in sorted(vars(args).items()) if name not in may_change}
    return json.loads(json.dumps({**config, **extra}, default=str))


@dataclasses.dataclass
class RunState:
    """Where a run stands, saved as each checkpoint's run_state.json: the optimizer updates done, the data position
    (epoch, batches of it done), the best validation scores so far with their "step", the validation history (one
    record per validation, with its "step"), and the `run_config` a resume must share."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best: dict | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | None, config: dict) -> "RunState":
        """The state saved in `checkpoint`, after checking that it was written with `config`; a new run's when
        `checkpoint` is None."""
        if checkpoint is None:
            return cls(config=config)
        saved = json.loads((checkpoint / RUN_STATE).read_text())
        saved_config = saved.get("config", {})
        differences = [
            f"{name}: {saved_config.get(name, '<unset>')!r} in the checkpoint, {config.get(name, '<unset>')!r} now"
            for name in sorted(set(saved_config) | set(config)) if saved_config.get(name) != config.get(name)
        ]
        if differences:
            raise TrainingError(
                f"checkpoint {checkpoint} belongs to another configuration; resume it with the settings it was "
                f"written with, or start a new run. Differences:\n  " + "\n  ".join(differences)
            )
        return cls(**saved)


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
        if accelerator.is_main_process:
            if save_extra is not None:
                save_extra(temporary)
            write_json(temporary / RUN_STATE, dataclasses.asdict(state))
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


def resume(accelerator: Accelerator, checkpoint: Path, state: RunState, best_dir: Path) -> None:
    """Load the weights, optimizer, schedule and RNG states of `checkpoint` (`state` holds the rest). When `best_dir`
    does not hold the checkpoint's best model (the run stopped between a new best and its checkpoint, or resumes into
    another folder), the best is tracked anew."""
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"Resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, "
                      f"{state.batches_in_epoch} batches into it")
    saved_best = best_dir / BEST_SCORES
    if state.best and (not saved_best.is_file() or json.loads(saved_best.read_text())["step"] != state.best["step"]):
        accelerator.print(f"{best_dir} does not hold the checkpoint's best model (step {state.best['step']}): "
                          f"the best is tracked anew from here")
        state.best = None


# ------------------------------------------------------------------------------------------------ the training loop

def grouped(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter): the micro-batches of each optimizer update."""
    iterator = iter(iterable)
    while group := list(itertools.islice(iterator, size)):
        yield group


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


def train_loop(accelerator: Accelerator, model, optimizer, lr_scheduler, train_dataloader, state: RunState, args,
               max_train_steps: int, *, batch_loss: Callable, count_name: str, validate: Callable[[], None],
               on_epoch: Callable[[int], None], checkpoint_extra: Callable[[Path], None] | None = None) -> None:
    """Train the prepared `model` from `state` (a new run's or a resumed one's) to `max_train_steps` optimizer
    updates, keeping `state` up to date. From `args`: --gradient_accumulation_steps, --max_grad_norm, --eval_steps,
    --checkpointing_steps, --checkpoints_total_limit and --output_dir.

    The task comes in as functions:
    - `batch_loss(model, batch)`: the batch's loss summed over its labels. An update's loss is the mean over the
      labels of all its micro-batches on all processes: the `batch["labels"]` that are not -100, counted as the
      Trainer counts `num_items_in_batch` (target tokens, images...) and logged as train/<count_name>.
    - `validate()`: evaluates, appends a record with its "step" to `state.history` and updates `state.best`; runs
      every --eval_steps updates (or after each epoch: 'epoch') and at the end.
    - `on_epoch(epoch)`: runs before each epoch, after `train_dataloader.set_epoch(epoch)`.
    - `checkpoint_extra(folder)`: adds files to each checkpoint (every --checkpointing_steps updates or 'epoch', and
      at the end).
    """
    if state.batches_in_epoch >= len(train_dataloader):  # checkpointed after the last batch of an epoch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    def checkpoint():
        save_checkpoint(accelerator, args.output_dir, state, keep_last=args.checkpoints_total_limit,
                        save_extra=checkpoint_extra)

    model.train()
    with tqdm(total=max_train_steps, initial=state.step, desc="training",
              disable=not accelerator.is_local_main_process) as progress:  # closed before any error message
        while state.step < max_train_steps:
            train_dataloader.set_epoch(state.epoch)
            on_epoch(state.epoch)
            epoch_dataloader = (accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
                                if state.batches_in_epoch else train_dataloader)
            for micro_batches in grouped(epoch_dataloader, args.gradient_accumulation_steps):
                # The loss is the mean over all labels of the update, on every process (Accelerate's recipe for
                # variable-size batches): each process divides its summed loss by the global label count, and the
                # factor num_processes undoes the averaging of gradients across processes.
                num_items = accelerator.reduce(sum((batch["labels"] != -100).sum() for batch in micro_batches), "sum")
                loss_sum = torch.zeros((), device=accelerator.device)
                for index, batch in enumerate(micro_batches):
                    last = index == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        loss = batch_loss(model, batch)
                        accelerator.backward(loss * accelerator.num_processes / num_items)
                    loss_sum += loss.detach()
                train_loss = (accelerator.reduce(loss_sum, "sum") / num_items).item()
                check_finite_loss(train_loss, state.step + 1, args.output_dir)
                grad_norm = (accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                             if args.max_grad_norm else None)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                state.step += 1
                state.batches_in_epoch += len(micro_batches)
                progress.update(1)
                progress.set_postfix(loss=f"{train_loss:.3f}", epoch=state.epoch)
                accelerator.log({"train/loss": train_loss, "train/learning_rate": lr_scheduler.get_last_lr()[0],
                                 f"train/{count_name}": num_items.item(), "train/epoch": state.epoch,
                                 **({"train/grad_norm": grad_norm.item()} if grad_norm is not None else {})},
                                step=state.step)
                done = state.step >= max_train_steps
                if done or (args.eval_steps != "epoch" and state.step % int(args.eval_steps) == 0):
                    validate()
                if args.checkpointing_steps and (done or (args.checkpointing_steps.isdigit()
                                                          and state.step % int(args.checkpointing_steps) == 0)):
                    checkpoint()
                if done:
                    break
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if state.step < max_train_steps:
                    if args.eval_steps == "epoch":
                        validate()
                    if args.checkpointing_steps == "epoch":
                        checkpoint()
    if not state.history or state.history[-1]["step"] != state.step:  # resumed from a finished run's last checkpoint
        validate()


# ------------------------------------------------------------------------------------- the best model and the output

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


def run_results(accelerator: Accelerator, model, state: RunState, args, runtime: float, command: str) -> dict:
    """What results.json says of a finished run besides the task's own: the parameter count, the best validation
    scores and their step, the number of updates, the training time and the hardware it took, the validation history,
    the flags (--hub_token left out) and the command."""
    return {
        "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "best_step": state.best["step"],
        "validation": {key: value for key, value in state.best.items() if key != "step"},
        "steps": state.step,
        "train_runtime_s": round(runtime, 1),
        "hardware": describe_hardware(accelerator),
        "history": state.history,
        "args": vars(args) | {"hub_token": None},
        "command": command,
    }


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


def finish_output(accelerator: Accelerator, args, best_dir: Path, results: dict, curves: list[str],
                  ignore_patterns: tuple[str, ...] = ()) -> None:
    """Make --output_dir the Hub-ready model folder, on the main process: the files of `best_dir` (not its scores),
    results.json, validation_curves.png (the `curves` metrics of results' history, labelled with its skip variant)
    and the model card; with --push_to_hub, upload it, leaving out the training state and `ignore_patterns`."""
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in best_dir.iterdir():
            if path.name != BEST_SCORES:
                (output_dir / path.name).write_bytes(path.read_bytes())
        write_json(output_dir / "results.json", results)
        plot_curves({results["skip"]["skip_variant"]: results["history"]}, curves, output_dir / "validation_curves.png")
        write_model_card(output_dir)
        if args.push_to_hub:
            url = push_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token,
                              ignore_patterns=[*IGNORED_BY_HUB, *ignore_patterns])
            accelerator.print(f"Pushed to {url}")


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
    "add_output_arguments",
    "parse_trainer_args",
    "command_line",
    "create_accelerator",
    "init_tracking",
    "read_data_file",
    "run_config",
    "RunState",
    "atomic_directory",
    "list_checkpoints",
    "save_checkpoint",
    "find_checkpoint",
    "resume",
    "grouped",
    "check_finite_loss",
    "train_loop",
    "save_best_model",
    "run_results",
    "finish_output",
    "write_json",
    "plot_curves",
    "push_to_hub",
]
