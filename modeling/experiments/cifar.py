"""PreAct-ResNets on CIFAR-10 with the paper's variant set (`rskip-reproduce cifar`), mean ± std over seeds.

Every run is a `rskip-train-image-classification` run of the grid runner (`rskip.experiments.runner`): resumable,
side by side, the table rebuilt from the finished runs. Validation is on the last training images (the offline data
has no other labelled split).
"""

from pathlib import Path

from ..training.reporting import plot_curves
from .runner import RunSpec, finished_row
from .summaries import fmt, mean_history, verdict
from .variants import ALL_VARIANTS, CIFAR_VARIANTS, folder_label

MODELS = ("preact_resnet20", "preact_resnet56", "preact_resnet110", "preact_resnet164")
# "mini" is the tests' size (seconds), "quick" a CPU's (minutes), "full" the paper's scale.
PRESETS = {
    "mini": dict(models=["preact_resnet20"], steps=2, batch=8, train_samples=32, eval_samples=16, validation_size=16,
                 variants=["plain", "rskip_ln K=2"]),
    # --models preact_resnet20 preact_resnet56 for both; -56 alone takes about three times -20's time.
    "quick": dict(models=["preact_resnet20"], steps=100, batch=64, train_samples=10000, eval_samples=1000,
                  variants=list(CIFAR_VARIANTS)),
    "full": dict(models=["preact_resnet110"], steps=64000, batch=128, train_samples=None, eval_samples=None,
                 variants=list(CIFAR_VARIANTS)),
}


def cifar_args(preset: dict, model: str, variant_flags: list[str], seed: int, train_file: Path) -> list[str]:
    """The `rskip-train-image-classification` flags of one run, without --output_dir and the checkpoint flags, which
    the runner adds."""
    return [
        "--train_file", str(train_file), "--validation_size", str(preset.get("validation_size", 5000)),
        "--model", model, "--per_device_train_batch_size", str(preset["batch"]),
        "--max_train_steps", str(preset["steps"]), "--eval_steps", str(max(preset["steps"] // 2, 1)),
        *(["--max_train_samples", str(preset["train_samples"])] if preset.get("train_samples") else []),
        *(["--max_eval_samples", str(preset["eval_samples"])] if preset.get("eval_samples") else []),
        *(["--num_warmup_steps", "0"] if preset["steps"] < 1000 else []),  # a short run has no room for warm-up
        "--seed", str(seed), *variant_flags,
    ]


def prepare(preset: dict, output_dir: Path, data_dir: Path) -> tuple[Path]:
    """What `run_specs` takes: the training file (CIFAR-10's 50,000 training images, parquet, in `data_dir`)."""
    return (data_dir / "cifar10" / "train.parquet",)


def run_specs(preset: dict, seeds: int, train_file: Path) -> list[RunSpec]:
    """Every model's variants and seeds, the reference variant first."""
    return [RunSpec(f"{model}-{folder_label(label)}-seed{seed}", "image_classification",
                    tuple(cifar_args(preset, model, ALL_VARIANTS[label], seed, train_file)),
                    {"model": model, "variant": label, "seed": seed})
            for model in preset["models"] for label in preset["variants"] for seed in range(seeds)]


def summarise_run(spec: RunSpec, folder: Path) -> dict | None:
    """One finished run's row (None while unfinished): its best validation top-1 and loss, or where it diverged."""
    if (finished := finished_row(spec, folder)) is None:
        return None
    row, result = finished
    if "diverged" in row:
        return row
    return {**row, "top1": result["validation"]["top1"], "loss": result["validation"]["loss"],
            "train_s": result["train_runtime_s"], "history": result["history"]}


def summarise(preset: dict, seeds: int, output_dir: Path, specs: list[RunSpec], family: str = "cifar") -> dict:
    """The table and curves of the finished runs, rebuilt from their folders; `family` names the figures and the
    note."""
    rows = [row for spec in specs if (row := summarise_run(spec, output_dir / "runs" / spec.name)) is not None]
    reference = preset["variants"][0]
    lines = [f"| model | variant | runs | validation top-1 (%) | validation loss | top-1 vs {reference} | train s |",
             "|---|---|---:|---:|---:|---|---:|"]
    figures = []
    for model in preset["models"]:
        base = [row.get("top1") for row in rows if row["model"] == model and row["variant"] == reference]
        for label in preset["variants"]:
            chosen = [row for row in rows if row["model"] == model and row["variant"] == label]
            diverged = sum("diverged" in row for row in chosen)
            lines.append(f"| {model} | {label} | {len(chosen)} of {seeds}{f' ({diverged} diverged)' if diverged else ''}"
                         f" | {fmt([row.get('top1') for row in chosen])} | {fmt([row.get('loss') for row in chosen], 3)}"
                         f" | {'—' if label == reference else verdict([row.get('top1') for row in chosen], base)} | "
                         f"{fmt([row.get('train_s') for row in chosen], 0)} |")
        histories = {label: mean_history([row["history"] for row in rows if row["model"] == model
                                          and row["variant"] == label and row.get("history")])
                     for label in preset["variants"]}
        if any(histories.values()):  # no figure until a run of `model` has finished with a history
            figures.append(plot_curves({label: history for label, history in histories.items() if history},
                                       ["loss", "top1"], output_dir / f"{family}_{model}_curves.png"))
    used = f" ({preset['eval_samples']} of them used)" if preset.get("eval_samples") else ""
    subset = f" from the first {preset['train_samples']}" if preset.get("train_samples") else ""
    note = (f"{family}: CIFAR-10, the last {preset.get('validation_size', 5000):,} training images held out for "
            f"validation{used}; {preset['steps']} updates of {preset['batch']} images{subset}, SGD with momentum, "
            f"peak rate 0.1, step schedule, He et al.'s crop-and-flip augmentation. Runs: the finished seeds (n of "
            f"{seeds}).")
    return {"rows": rows, "finished": len(rows), "planned": len(specs),
            "total_train_s": sum(row.get("train_s") or 0 for row in rows), "note": note, "table": "\n".join(lines),
            "figures": [figure.name for figure in figures]}


__all__ = ["MODELS", "PRESETS", "cifar_args", "prepare", "run_specs", "summarise"]
