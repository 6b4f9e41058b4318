"""The training run both tasks share, in one function: `train(task, config)`.

It goes accelerator → data → model → optimizer → prepare → resume → loop → best model → output folder, as
Accelerate's `complete_nlp_example.py` does. What depends on the task (its data, model, loss, evaluation and what
"better" means) comes in as one `TrainingTask`; what the loop itself needs comes in as a typed `TrainingConfig`.

The loss of an update is the mean over all its labels (target tokens, images...), across its micro-batches and
processes, so a run gives the same updates whatever the gradient accumulation and the number of processes.
"""

import contextlib
import dataclasses
import itertools
import math
import signal
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .checkpoints import (
    BEST_MODEL,
    RunState,
    check_output_dir,
    find_checkpoint,
    list_checkpoints,
    resume,
    save_best_model,
    save_checkpoint,
    settings_to_check,
)
from .errors import TrainingDiverged, TrainingError, on_main_process
from .hub import HUB_STRATEGIES, IGNORED_BY_HUB, resolve_hub_checkpoint, start_hub_uploads
from .reporting import finish_output, init_tracking, run_results, write_model_folder
from .signals import RunStopped, StopSignals

# Settings a run may be resumed with other values for: where it writes, how often it evaluates and saves, logging.
MAY_CHANGE_ON_RESUME = {
    "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "eval_steps",
    "with_tracking", "report_to", "push_to_hub", "hub_model_id", "hub_token", "hub_strategy",
    "overwrite_output_dir", "diagnostics_steps",
}


@dataclasses.dataclass
class TrainingConfig:
    """What the shared run needs from the command line. `eval_steps` and `checkpointing_steps` are a number of
    optimizer updates or "epoch"; `max_train_steps`, when set, overrides `num_train_epochs`."""

    output_dir: str
    num_train_epochs: int
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    num_warmup_steps: int = 0
    seed: int = 42
    mixed_precision: str | None = None
    eval_steps: int | str = "epoch"
    checkpointing_steps: int | str | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    with_tracking: bool = False
    report_to: str = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    hub_strategy: str = "end"
    diagnostics_steps: tuple[int, ...] = ()

    def __post_init__(self):
        def check(name: str, valid: bool, allowed: str):
            if not valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: {allowed}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("num_train_epochs", "gradient_accumulation_steps"):
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        check("max_train_steps", self.max_train_steps is None or (is_int(self.max_train_steps)
                                                                  and self.max_train_steps >= 1),
              "None or an integer >= 1")
        check("checkpoints_total_limit", self.checkpoints_total_limit is None or (
            is_int(self.checkpoints_total_limit) and self.checkpoints_total_limit >= 1), "None or an integer >= 1")
        check("num_warmup_steps", is_int(self.num_warmup_steps) and self.num_warmup_steps >= 0, "an integer >= 0")
        check("max_grad_norm", isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm)
              and self.max_grad_norm >= 0, "a number >= 0 (0: no clipping)")
        check("eval_steps", self.eval_steps == "epoch" or (is_int(self.eval_steps) and self.eval_steps >= 1),
              "an integer >= 1 or 'epoch'")
        check("checkpointing_steps", self.checkpointing_steps in (None, "epoch") or (
            is_int(self.checkpointing_steps) and self.checkpointing_steps >= 1), "None, an integer >= 1 or 'epoch'")
        check("hub_strategy", self.hub_strategy in HUB_STRATEGIES, ", ".join(HUB_STRATEGIES))
        check("diagnostics_steps", all(is_int(step) and step >= 0 for step in self.diagnostics_steps),
              "integers >= 0 (0: at initialisation)")

    @classmethod
    def from_args(cls, args) -> "TrainingConfig":
        """The fields of a parsed command line (an `argparse.Namespace`) that this config has."""
        return cls(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls)
                      if hasattr(args, spec.name)})


class TrainingTask:
    """The parts of a run that depend on the task, called by `train` in this order:

    1. `load_data(accelerator, checkpoint)`: read the data (and build or load a processor, such as a tokenizer).
    2. `build_model()`: the model to train.
    3. `create_dataloaders(model, accelerator)`: the training loader, and the evaluation loaders by split name
       ("validation" at least).
    4. `create_optimizer(model)`, `create_scheduler(optimizer, max_train_steps)`.
    5. `summary(model)`: a line on the model and the data, printed at the start.
    6. For every epoch `set_epoch(epoch)`; for every micro-batch `batch_loss(model, batch)`, the loss summed over the
       batch's labels (`batch["labels"]`, -100 where there is none).
    7. For every validation `evaluate(model, dataloader, accelerator, split)`, which returns the scores and the files to
       save with the model if it is the best so far; `is_better(scores, best)` and `describe_scores(scores)`.
    8. `finish(accelerator, best_dir, eval_dataloaders, output_dir)`: more results once training ends (a test set).

    Attributes: `args` (every setting of the run, recorded in results.json and checked on resume), `name` (the
    tracker's project), `count_name` (what the loss is averaged over: "tokens", "images"), `history_metrics` (the
    validation scores kept at every validation; the first two are plotted), `batch_description` (one micro-batch, in
    words), `may_change_on_resume` (settings of the task a resume may change), `processor` (saved with the best
    model and in every checkpoint, or None), `skip_options` (the model's, once built), `hub_ignore_patterns`.
    """

    name: str
    count_name: str
    history_metrics: tuple[str, ...]
    batch_description: str
    may_change_on_resume: frozenset[str] = frozenset()
    processor = None
    hub_ignore_patterns: tuple[str, ...] = ()

    def __init__(self, args):
        self.args = args

    def save_to_checkpoint(self, folder: Path) -> None:
        """Add the processor (under `processor/`... the task decides) to a checkpoint folder."""

    def run_description(self) -> dict:
        """The task's entries at the top of results.json (the skip options, the model...)."""
        return {"skip": self.skip_options.to_dict()}


def create_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's `Accelerator` (mixed precision; trackers with `with_tracking`, logging to <output_dir>/logs), once
    the output folder exists."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=config.report_to if config.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The schedule counts optimizer updates, whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def train(task: TrainingTask, config: TrainingConfig, command: str) -> dict:
    """Train `task`'s model as `config` says, from scratch or from a checkpoint, and make `config.output_dir` the
    Hub-ready folder of the best model; returns what results.json records. `command` is the command line, for the
    record."""
    with StopSignals() as signals:  # SIGTERM, SIGINT: stop after the current update, with a checkpoint
        # Accelerator, resume point and seed
        output_dir = Path(config.output_dir)
        accelerator = create_accelerator(config)
        hub_repo_id = config.hub_model_id or output_dir.name
        # A push that cannot work fails now, not after training; uploads run on the main process only.
        hub = on_main_process(accelerator, lambda: start_hub_uploads(
            hub_repo_id, config.hub_token, config.hub_strategy, [*IGNORED_BY_HUB, *task.hub_ignore_patterns],
            log=accelerator.print)) if config.push_to_hub else None
        settings = vars(task.args)
        run_config = settings_to_check(settings, MAY_CHANGE_ON_RESUME | task.may_change_on_resume,
                                       num_processes=accelerator.num_processes)
        resume_from = resolve_hub_checkpoint(config.resume_from_checkpoint, hub_repo_id, config.hub_token)
        checkpoint = find_checkpoint(output_dir, resume_from, run_config, report=accelerator.print)
        on_main_process(accelerator, lambda: check_output_dir(output_dir, checkpoint, run_config,
                                                              config.overwrite_output_dir))
        state = RunState.from_checkpoint(checkpoint, run_config)
        set_seed(config.seed)

        # Data and model
        task.load_data(accelerator, checkpoint)
        model = task.build_model()
        train_dataloader, eval_dataloaders = task.create_dataloaders(model, accelerator)

        # Optimizer and schedule, counted in optimizer updates
        optimizer = task.create_optimizer(model)
        updates_per_epoch = math.ceil(math.ceil(len(train_dataloader) / accelerator.num_processes)
                                      / config.gradient_accumulation_steps)
        max_train_steps = config.max_train_steps or config.num_train_epochs * updates_per_epoch
        if config.num_warmup_steps > max_train_steps:
            warnings.warn(f"num_warmup_steps={config.num_warmup_steps} exceeds the {max_train_steps} updates of this run: "
                          f"the learning rate never reaches its peak (see --num_warmup_steps)", stacklevel=2)
        lr_scheduler = task.create_scheduler(optimizer, max_train_steps)
        summary = task.summary(model)

        model, optimizer, train_dataloader, lr_scheduler, *prepared = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler, *eval_dataloaders.values())
        eval_dataloaders = dict(zip(eval_dataloaders, prepared))
        if config.with_tracking:
            init_tracking(accelerator, task.name, settings)

        # Resume: weights, optimizer, schedule and RNG from the checkpoint; the data position is in `state`.
        best_dir = output_dir / BEST_MODEL
        if checkpoint:
            resume(accelerator, checkpoint, state, best_dir)
        accelerator.print(
            f"{summary}\n{updates_per_epoch} updates per epoch of {task.batch_description} x "
            f"{accelerator.num_processes} processes x {config.gradient_accumulation_steps} accumulation; "
            f"{max_train_steps} updates ({math.ceil(max_train_steps / updates_per_epoch)} epochs), "
            f"{config.num_warmup_steps} warmup updates, mixed precision {accelerator.mixed_precision}"
        )

        def validate():
            scores, files = task.evaluate(model, eval_dataloaders["validation"], accelerator, "validation")
            record = {"step": state.step, "epoch": round(state.step / updates_per_epoch, 2),
                      **{name: scores[name] for name in task.history_metrics}}
            state.history.append(record)
            accelerator.log({f"validation/{name}": scores[name] for name in task.history_metrics}, step=state.step)
            improved = state.best is None or task.is_better(scores, state.best)
            accelerator.print(f"step {state.step} (epoch {record['epoch']:.2f}): validation "
                              f"{task.describe_scores(scores)}{' (best so far)' if improved else ''}")
            if improved:
                state.best = {"step": state.step, **scores}
                save_best_model(accelerator, model, best_dir, state.best, task.processor, files)

        def checkpoint_now() -> Path:
            state.train_seconds = training_seconds()
            path = save_checkpoint(accelerator, output_dir, state, keep_last=config.checkpoints_total_limit,
                                   save_extra=task.save_to_checkpoint)
            if hub:
                hub.checkpoint_saved(path, state.step, describe_best(), write_best_model if state.best else None)
            return path

        def describe_best():
            return (f"validation {task.describe_scores(state.best)} (step {state.best['step']})" if state.best
                    else "no validation yet")

        def write_best_model(folder):
            """The best model so far with its results and card, as the output folder will hold it at the end."""
            results = {**task.run_description(),
                       **run_results(accelerator, model, state, settings, training_seconds(), command)}
            write_model_folder(folder, best_dir, results, list(task.history_metrics[:2]), task.skip_options.label(),
                               repo_id=hub_repo_id)

        diagnostics = Diagnostics(config.diagnostics_steps, eval_dataloaders["validation"], task.batch_loss)
        diagnostics.maybe_run(accelerator, model, state.step)

        # Training; the time of the sittings before a resume is in the checkpoint
        start_time, earlier_seconds = time.time(), state.train_seconds

        def training_seconds() -> float:
            return earlier_seconds + time.time() - start_time

        if state.batches_in_epoch >= len(train_dataloader):  # checkpointed after the last batch of an epoch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        model.train()
        with tqdm(total=max_train_steps, initial=state.step, desc="training",
                  disable=not accelerator.is_local_main_process) as progress:  # closed before any error message
            while state.step < max_train_steps:
                train_dataloader.set_epoch(state.epoch)
                task.set_epoch(state.epoch)  # Accelerate passes the epoch on only to what it wraps: the task sets the rest
                epoch_batches = (accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
                                 if state.batches_in_epoch else train_dataloader)
                for micro_batches in grouped(epoch_batches, config.gradient_accumulation_steps):
                    train_loss, num_items = accumulate_gradients(accelerator, model, micro_batches, task.batch_loss)
                    check_finite_loss(train_loss, state.step + 1, output_dir)
                    grad_norm = (accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                                 if config.max_grad_norm else None)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                    state.step += 1
                    state.batches_in_epoch += len(micro_batches)
                    # redrawn by update() at tqdm's pace (TQDM_MININTERVAL), not forced at every step
                    progress.set_postfix(loss=f"{train_loss:.3f}", epoch=state.epoch, refresh=False)
                    progress.update(1)
                    accelerator.log({"train/loss": train_loss, "train/learning_rate": lr_scheduler.get_last_lr()[0],
                                     f"train/{task.count_name}": num_items, "train/epoch": state.epoch,
                                     **({"train/grad_norm": grad_norm.item()} if grad_norm is not None else {})},
                                    step=state.step)
                    diagnostics.maybe_run(accelerator, model, state.step)
                    done = state.step >= max_train_steps
                    if done or is_due(config.eval_steps, state.step):
                        validate()
                    saved = None
                    if config.checkpointing_steps and (done or is_due(config.checkpointing_steps, state.step)):
                        saved = checkpoint_now()
                    if not done and (signum := signals.requested(accelerator)):
                        saved = saved or checkpoint_now()
                        accelerator.print(
                            f"Stopped by {signal.Signals(signum).name} after update {state.step}; saved {saved}. To "
                            f"continue, run the same command with --resume_from_checkpoint latest (or {saved}).")
                        accelerator.end_training()
                        raise RunStopped(signum, f"stopped by {signal.Signals(signum).name} at update {state.step}")
                    if done:
                        break
                else:
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                    if state.step < max_train_steps:
                        if config.eval_steps == "epoch":
                            validate()
                        if config.checkpointing_steps == "epoch":
                            checkpoint_now()
        if not state.history or state.history[-1]["step"] != state.step:  # resumed from a finished run's last checkpoint
            validate()
        runtime = training_seconds()

        # Results, the task's last evaluations with the best model, and the Hub-ready output folder
        results = {**task.run_description(), **run_results(accelerator, model, state, settings, runtime, command)}
        results.update(task.finish(accelerator, best_dir, eval_dataloaders, output_dir))
        # What fails from here on (the card, the upload) is reported after the rest is done, so nothing is lost
        unfinished = [finish_output(accelerator, output_dir, best_dir, results, curves=list(task.history_metrics[:2]),
                                    label=task.skip_options.label())]
        diagnostics.save(accelerator, output_dir, label=task.skip_options.label())
        if hub:
            unfinished.append(hub.training_ended(output_dir, state.step, describe_best()))
        accelerator.print(f"Saved the best model (step {results['best_step']}: {task.describe_scores(results['validation'])}"
                          f") and results.json to {output_dir}")
        accelerator.end_training()
        unfinished = [problem for problem in unfinished if problem]
        if unfinished:
            raise TrainingError("; ".join(unfinished))
        return results


class Diagnostics:
    """`--diagnostics_steps`: per-sublayer gradient norms and the output change under one Adam step
    (`rskip.diagnostics.measure`) after the chosen updates (0: at initialisation), on the first validation batch,
    with the task's loss. Logged to the trackers; `save` writes diagnostics.json and diagnostics.png. Measuring
    draws no random number and leaves the weights and gradients as they were, so the run is unchanged."""

    def __init__(self, steps: tuple[int, ...], dataloader, batch_loss):
        self.steps, self.dataloader, self.batch_loss = set(steps), dataloader, batch_loss
        self.batch, self.reports = None, {}

    def maybe_run(self, accelerator: Accelerator, model, step: int) -> None:
        if step not in self.steps or step in self.reports:
            return
        from ..diagnostics import measure

        if self.batch is None:
            self.batch = next(iter(self.dataloader))

        def loss_fn(measured, batch):
            loss = self.batch_loss(measured, batch)
            logits = measured(**{key: value for key, value in batch.items() if key != "labels"}).logits
            return loss / (batch["labels"] != -100).sum(), logits

        report = measure(accelerator.unwrap_model(model), self.batch, loss_fn=loss_fn)
        self.reports[step] = report
        accelerator.log({"diagnostics/gradient_ratio": report["gradient_ratio"],
                         "diagnostics/output_change": report["output_change"]}, step=step)
        accelerator.print(f"step {step}: diagnostics: first/last sublayer gradient norm "
                          f"{report['gradient_ratio']:.3g}, output change under one Adam step {report['output_change']:.3g}")

    def save(self, accelerator: Accelerator, output_dir: Path, label: str) -> None:
        if not self.reports or not accelerator.is_main_process:
            return
        from ..diagnostics import plot_layers
        from .checkpoints import write_json

        write_json(output_dir / "diagnostics.json", {str(step): report for step, report in self.reports.items()})
        plot_layers({f"{label}, step {step}": report for step, report in sorted(self.reports.items())},
                    output_dir / "diagnostics.png")


def is_due(every: int | str | None, step: int) -> bool:
    """Whether an action done every `every` updates (not 'epoch' or None) is due after update `step`."""
    return isinstance(every, int) and step % every == 0


def grouped(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter): the micro-batches of each optimizer update."""
    iterator = iter(iterable)
    while group := list(itertools.islice(iterator, size)):
        yield group


def accumulate_gradients(accelerator: Accelerator, model, micro_batches: list[dict], batch_loss) -> tuple[float, int]:
    """Back-propagate one update's micro-batches; returns the update's loss (the mean over all its labels on all
    processes) and that number of labels.

    Accelerate's recipe for variable-size batches: each process divides its summed loss by the global label count
    (counted as the Trainer counts `num_items_in_batch`), and the factor num_processes undoes the averaging of
    gradients across processes. Gradients are synchronised once, on the last micro-batch."""
    num_items = accelerator.reduce(sum((batch["labels"] != -100).sum() for batch in micro_batches), "sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = batch_loss(model, batch)
            accelerator.backward(loss * accelerator.num_processes / num_items)
        loss_sum += loss.detach()
    return (accelerator.reduce(loss_sum, "sum") / num_items).item(), num_items.item()


def check_finite_loss(loss: float, step: int, output_dir: str | Path) -> None:
    """Stop a diverged run: a non-finite `loss` at optimizer step `step` raises `TrainingError`, naming the last
    good checkpoint, which is left untouched (nothing is saved after the failure)."""
    if math.isfinite(loss):
        return
    checkpoints = list_checkpoints(output_dir)
    last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "there is no checkpoint yet"
    raise TrainingDiverged(
        f"the training loss is {loss} at step {step}; training stopped before updating the weights and saved "
        f"nothing more ({last}). Try a lower --learning_rate, a longer warmup or gradient clipping.",
        step, loss,
    )


__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "TrainingConfig",
    "TrainingTask",
    "create_accelerator",
    "train",
    "grouped",
    "accumulate_gradients",
    "check_finite_loss",
]
