"""CIFAR-10 trained to the end of a short schedule: a PreAct-ResNet-20, `plain` against rSkip+LN (K = 2) and post-LN
(`rskip-reproduce cifar --converged`).

Each run is a `rskip-train-image-classification` run of the grid runner (`rskip.experiments.runner`): resumable,
side by side, tables rebuilt from the finished runs. Validation is on the last 5,000 training images (the offline
data has no other labelled split); the figure reported is the last epoch's top-1, not the best epoch's, so that nothing
is chosen on the images it is measured on.
"""

from pathlib import Path

from ..training.reporting import plot_curves
from .runner import RunSpec, finished_row
from .summaries import binomial_error, fmt, mean_history, verdict
from .variants import ALL_VARIANTS, folder_label

PRESETS = {
    # the tests': seconds
    "mini": dict(model="preact_resnet20", variants=["plain", "rskip_ln K=2"], epochs=1, batch=16,
                 train_samples=None, validation_size=16, eval_samples=None, checkpointing_steps="2"),
    # 15 epochs of 45,000 images at batch 128, cosine schedule from 0.1: 56-81 minutes a run on one CPU thread
    "quick": dict(model="preact_resnet20", variants=["plain", "rskip_ln K=2", "post_ln"], epochs=15, batch=128,
                  train_samples=None, validation_size=5000, eval_samples=None, checkpointing_steps="epoch"),
}
DEFAULT_SEEDS = 2


def prepare(preset: dict, output_dir: Path, data_dir: Path) -> tuple[Path]:
    """What `run_specs` takes: the training file (CIFAR-10's 50,000 training images, parquet, in `data_dir`)."""
    return (data_dir / "cifar10" / "train.parquet",)


def run_specs(preset: dict, seeds: int, train_file: Path) -> list[RunSpec]:
    """The grid, the first two variants' seeds first: the third is run if time allows."""
    order = [(label, seed) for label in preset["variants"][:2] for seed in range(seeds)]
    order.sort(key=lambda pair: pair[1])
    order += [(label, seed) for label in preset["variants"][2:] for seed in range(seeds)]
    specs = []
    for label, seed in order:
        argv = (
            "--train_file", str(train_file), "--validation_size", str(preset["validation_size"]), "--model", preset["model"],
            "--per_device_train_batch_size", str(preset["batch"]), "--num_train_epochs", str(preset["epochs"]),
            "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0", "--eval_steps", "epoch",
            *(["--max_train_samples", str(preset["train_samples"])] if preset["train_samples"] else []),
            *(["--max_eval_samples", str(preset["eval_samples"])] if preset["eval_samples"] else []),
            "--seed", str(seed), *ALL_VARIANTS[label],
        )
        specs.append(RunSpec(f"{preset['model']}-{folder_label(label)}-seed{seed}", "image_classification", argv,
                             {"model": preset["model"], "variant": label, "seed": seed},
                             preset["checkpointing_steps"]))
    return specs


def summarise(preset: dict, seeds: int, output_dir: Path, specs: list[RunSpec]) -> dict:
    """The table and curves of the finished runs, rebuilt from their folders."""
    rows = []
    for spec in specs:
        if (finished := finished_row(spec, output_dir / "runs" / spec.name)) is None:
            continue
        row, result = finished
        if "diverged" in row:
            rows.append(row)
            continue
        last = result["history"][-1]
        samples = preset["eval_samples"] or preset["validation_size"]
        rows.append({**row, "top1": last["top1"], "loss": last["loss"], "best_top1": result["validation"]["top1"],
                     "binomial_error": 100 * binomial_error(last["top1"] / 100, samples),
                     "train_s": result["train_runtime_s"], "history": result["history"]})
    reference = preset["variants"][0]

    def against(label: str, other: str) -> str:
        """The verdict of `label` against `other` on last-epoch top-1 (higher is better) and loss (lower is)."""
        def values(variant, key):
            return [row.get(key) for row in rows if row["variant"] == variant]
        return (f"{verdict(values(label, 'top1'), values(other, 'top1'))} / "
                f"{verdict(values(label, 'loss'), values(other, 'loss'), higher_is_better=False)}")

    lines = [f"| variant | runs | last-epoch top-1 (%) | ± binomial error | best-epoch top-1 (%) | last-epoch loss | "
             f"vs {reference}: top-1 / loss | train h |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for label in preset["variants"]:
        chosen = [row for row in rows if row["variant"] == label]
        diverged = sum("diverged_at_step" in row for row in chosen)
        top1 = [row.get("top1") for row in chosen]
        lines.append(
            f"| {label} | {len(chosen)} of {seeds}{f' ({diverged} diverged)' if diverged else ''} | {fmt(top1)} | "
            f"{fmt([row.get('binomial_error') for row in chosen])} | {fmt([row.get('best_top1') for row in chosen])} | "
            f"{fmt([row.get('loss') for row in chosen], 3)} | "
            f"{'—' if label == reference else against(label, reference)} | "
            f"{fmt([(row.get('train_s') or 0) / 3600 for row in chosen if 'train_s' in row])} |")
    # The variants other than the reference against each other, e.g. rSkip+LN against post-LN.
    others = preset["variants"][1:]
    pairs = [f"{label} vs {other} (top-1 / loss): {against(label, other)}."
             for index, label in enumerate(others) for other in others[index + 1:]]
    lines += ["", *pairs] if pairs else []
    histories = {label: mean_history([row["history"] for row in rows if row["variant"] == label and "history" in row])
                 for label in preset["variants"]}
    figures = []
    if any(histories.values()):
        figures.append(plot_curves({label: history for label, history in histories.items() if history},
                                   ["loss", "top1"], output_dir / f"cifar_converged_{preset['model']}_curves.png"))
    used = f" ({preset['eval_samples']} of them used)" if preset["eval_samples"] else ""
    note = (f"CIFAR-10, {preset['model']}, {preset['epochs']} epochs at batch {preset['batch']} "
            f"({'the first ' + str(preset['train_samples']) + ' of ' if preset['train_samples'] else ''}the "
            f"training images but the last {preset['validation_size']:,}), SGD with momentum 0.9, peak rate 0.1 with cosine decay to 0 and no warm-up, "
            f"weight decay 1e-4, He et al.'s crop-and-flip augmentation; validation on the last "
            f"{preset['validation_size']:,} training images{used}. "
            f"Top-1 of the last epoch (the best epoch's is shown beside it, but it is chosen on the same images); the "
            f"binomial error is that of one run's accuracy on the validation images, the ± of the other columns the "
            f"seeds' standard deviation.")
    total_train_s = sum(row.get("train_s") or 0 for row in rows)
    return {"rows": rows, "finished": len(rows), "planned": len(specs), "total_train_s": total_train_s, "note": note,
            "table": "\n".join(lines), "figures": [figure.name for figure in figures]}


__all__ = ["PRESETS", "DEFAULT_SEEDS", "prepare", "run_specs", "summarise"]
