"""The depth map: post-LN, pre-LN and rSkip+LN (K = 2) trained to the end on the number task of `make demo`, by
depth and learning-rate regime, several seeds each (`rskip-reproduce depth`).

Every run is a `rskip-train-translation` run of the grid runner (`rskip.experiments.runner`), so the grid can be
completed over several sittings; the tables and plots are rebuilt from whatever runs have finished, with the number of
finished seeds shown per cell.
"""

import math
from collections import Counter
from pathlib import Path

from .depth_rules import (REGIMES, TRAINS_AT_EXACT_MATCH, bigram_loss, divergence_threshold, task_outcome,
                          unigram_loss)
from .number_task import prepare_number_task
from .runner import RunSpec, finished_row
from .summaries import fmt, mean_std, target_ids, verdict
from .variants import STABILITY_VARIANTS, folder_label

VARIANTS = STABILITY_VARIANTS
PRESETS = {
    # the tests': seconds
    "mini": dict(depths=[1, 2], steps=4, eval_steps=2, max_tokens=256, train_size=200, eval_size=8, beams=1,
                 model="transformer-tiny", checkpointing_steps=2),
    # trained to the end on 2 CPU cores: about 4, 8 and 16 minutes a run at 6+6, 12+12 and 24+24 (one thread each)
    "quick": dict(depths=[6, 12, 24], steps=800, eval_steps=50, max_tokens=2048, train_size=8000, eval_size=200,
                  beams=4, model="transformer-tiny", checkpointing_steps=100),
}
CONVERGED_WITHIN = 0.05  # "converged at": the first evaluation within 5 % of the final validation loss


def run_specs(preset: dict, seeds: int, data: Path, tokenizer: Path) -> list[RunSpec]:
    """The grid, cheapest depth first and all cells of one seed before the next seed, so that a partial grid has
    every cell of the shallower depths."""
    specs = []
    for depth in preset["depths"]:
        for seed in range(seeds):
            for regime, (lr, warmup_fraction) in REGIMES.items():
                for label, flags in VARIANTS.items():
                    warmup = round(preset["steps"] * warmup_fraction)
                    argv = (
                        "--train_file", str(data / "train"), "--validation_file", str(data / "valid"),
                        "--test_file", str(data / "test"), "--source_lang", "en", "--target_lang", "de",
                        "--tokenizer_name", str(tokenizer), "--model_preset", preset["model"],
                        "--config_overrides", f"encoder_layers={depth},decoder_layers={depth}",
                        "--learning_rate", str(lr), "--num_warmup_steps", str(warmup),
                        "--max_tokens", str(preset["max_tokens"]), "--max_train_steps", str(preset["steps"]),
                        "--eval_steps", str(preset["eval_steps"]), "--num_beams", str(preset["beams"]),
                        "--val_max_target_length", "24", "--bleu_tokenize", "char", "--seed", str(seed), *flags,
                    )
                    settings = {"depth": depth, "regime": regime, "lr": lr, "warmup": warmup, "variant": label,
                                "seed": seed}
                    specs.append(RunSpec(f"d{depth}-{regime}-{folder_label(label)}-seed{seed}", "translation", argv,
                                         settings, str(preset["checkpointing_steps"])))
    return specs


def prepare(preset: dict, output_dir: Path, data_dir: Path | None = None) -> tuple[Path, Path]:
    """What `run_specs` takes: the task's data and tokenizer, generated once in `output_dir` (seed 0) and shared by
    every run (`data_dir` is not read: the task needs no download)."""
    return prepare_number_task(output_dir, train_size=preset["train_size"], eval_size=preset["eval_size"])


def summarise_run(spec: RunSpec, folder: Path, references: list[str], diverged_above: float) -> dict | None:
    """One finished run's row (None while unfinished)."""
    if (finished := finished_row(spec, folder)) is None:
        return None
    row, result = finished
    if "diverged" in row:
        return {**row, "outcome": "diverges"}
    history = result["history"]
    final = history[-1]["loss"]
    predictions = (folder / "predictions_test.txt").read_text().splitlines()
    converged = next((record["step"] for record in history
                      if math.isfinite(record["loss"]) and abs(record["loss"] - final) <= CONVERGED_WITHIN * final),
                     None)
    exact = 100 * sum(map(str.__eq__, predictions, references)) / len(references)
    return {**row, "outcome": task_outcome(final, exact, diverged_above), "test_exact": exact,
            "test_chrf": result["test"]["chrf"], "final_validation_loss": final, "converged_at_step": converged,
            "train_s": result["train_runtime_s"], "history": history}


def summarise(preset: dict, seeds: int, output_dir: Path, specs: list[RunSpec]) -> dict:
    """Tables and plots of the finished runs, rebuilt from their folders."""
    data, tokenizer = output_dir / "data", output_dir / "tokenizer"
    references = (data / "test.de").read_text().splitlines()
    train_ids, valid_ids, vocab_size = target_ids(tokenizer, (data / "train.de").read_text().splitlines(),
                                                  (data / "valid.de").read_text().splitlines())
    # For scale in the note: the validation losses of models that never read the source.
    unigram, bigram = unigram_loss(train_ids, valid_ids, vocab_size), bigram_loss(train_ids, valid_ids, vocab_size)
    diverged_above = divergence_threshold(vocab_size)
    rows = [row for spec in specs
            if (row := summarise_run(spec, output_dir / "runs" / spec.name, references, diverged_above)) is not None]

    def cell(depth, regime, label):
        return [row for row in rows if (row["depth"], row["regime"], row["variant"]) == (depth, regime, label)]

    labels = list(VARIANTS)
    tables = []
    for title, key, digits in (("test exact match (%)", "test_exact", 1), ("test chrF", "test_chrf", 1),
                               ("final validation loss", "final_validation_loss", 3),
                               ("update at which validation loss came within 5 % of its final value",
                                "converged_at_step", 0)):
        lines = [f"#### {title}", "", "| depth | regime | " + " | ".join(labels) + " |",
                 "|---:|---|" + "---:|" * len(labels)]
        for depth in preset["depths"]:
            for regime in REGIMES:
                lines.append(f"| {depth}+{depth} | {regime} | " + " | ".join(
                    f"{fmt([row.get(key) for row in cell(depth, regime, label)], digits)} "
                    f"(n={len(cell(depth, regime, label))})" for label in labels) + " |")
        tables.append("\n".join(lines))
    lines = ["#### outcome, and rSkip+LN's verdict on test exact match / final validation loss", "",
             "| depth | regime | " + " | ".join(labels) + " | rskip_ln K=2 vs post_ln | rskip_ln K=2 vs pre_ln |",
             "|---:|---|" + "---|" * (len(labels) + 2)]
    for depth in preset["depths"]:
        for regime in REGIMES:
            outcomes = [", ".join(f"{count} {outcome}" for outcome, count in
                                  sorted(Counter(row["outcome"] for row in cell(depth, regime, label)).items()))
                        or "—" for label in labels]

            def values(label, key):
                return [row.get(key) for row in cell(depth, regime, label)]

            ours = "rskip_ln K=2"
            verdicts = [f"{verdict(values(ours, 'test_exact'), values(other, 'test_exact'))} / "
                        + verdict(values(ours, "final_validation_loss"), values(other, "final_validation_loss"),
                                  higher_is_better=False)
                        for other in ("post_ln", "pre_ln")]
            lines.append(f"| {depth}+{depth} | {regime} | " + " | ".join(outcomes + verdicts) + " |")
    tables.insert(0, "\n".join(lines))

    figures = [plot_by_depth_with_spread(rows, preset["depths"], "test_exact", "test exact match (%)",
                                         output_dir / "depth_map_exact_match.png"),
               plot_by_depth_with_spread(rows, preset["depths"], "final_validation_loss", "final validation loss",
                                         output_dir / "depth_map_validation_loss.png")]
    deepest = [row for row in rows if row["depth"] == max(preset["depths"]) and "history" in row]
    if deepest:
        figures.append(plot_validation_curves(deepest, output_dir / f"depth_map_curves_depth{max(preset['depths'])}.png"))
    note = (f"The number task of `make demo` ({preset['train_size']:,} training pairs, {preset['eval_size']} "
            f"validation and {preset['eval_size']} test pairs, English number words -> German), "
            f"{preset['model']} (d = 64) at D+D layers, {preset['steps']} updates of ≤ {preset['max_tokens']:,} "
            f"tokens, inverse-sqrt schedule, Adam (0.9, 0.98), label smoothing 0.1, clipping at 1; regimes: "
            + "; ".join(f"{name}: peak rate {lr:g}, warm-up {round(preset['steps'] * fraction)} updates"
                        for name, (lr, fraction) in REGIMES.items())
            + f". Test: the best checkpoint by validation BLEU (evaluated every {preset['eval_steps']} updates), "
            f"beam {preset['beams']}; exact match: the whole number right. Outcome: diverges = a non-finite "
            f"training loss, or a final validation loss above ln(vocabulary) + 1 = {diverged_above:.2f}; trains = at "
            f"least {TRAINS_AT_EXACT_MATCH:g} % of the test numbers exactly right; stalls = fewer. For scale, models "
            f"that never read the source reach a validation loss of {unigram:.2f} (the target tokens' frequencies) "
            f"and {bigram:.2f} (also the previous token: a bigram model). Cells: mean ± std over the finished seeds (n of {seeds}).")
    total_train_s = sum(row.get("train_s") or 0 for row in rows)
    return {"rows": rows, "finished": len(rows), "planned": len(specs), "unigram_loss": unigram,
            "bigram_loss": bigram,
            "diverged_above": diverged_above, "total_train_s": total_train_s, "note": note,
            "table": "\n\n".join(tables), "figures": [figure.name for figure in figures]}


def plot_by_depth_with_spread(rows: list[dict], depths: list[int], key: str, ylabel: str, path: Path) -> Path:
    """`key` against depth, one line per variant and regime (solid: moderate, dashed: aggressive) through the mean
    over seeds, each seed a dot beside it: outcomes are often split (some seeds train, others stall), which a mean
    with error bars would hide."""
    from ..diagnostics import _pyplot

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    series = [(label, regime) for label in VARIANTS for regime in REGIMES]
    for index, (label, regime) in enumerate(series):
        colour, style = f"C{list(VARIANTS).index(label)}", "-" if regime == next(iter(REGIMES)) else "--"
        offset = 1 + 0.03 * (index - (len(series) - 1) / 2)  # the dots of the six lines side by side at each depth
        means = []
        for depth in depths:
            values = [row.get(key) for row in rows
                      if (row["depth"], row["regime"], row["variant"]) == (depth, regime, label)]
            finite = [value for value in values if value is not None and math.isfinite(value)]
            axis.plot([depth * offset] * len(finite), finite, ".", color=colour, alpha=0.6, markersize=6)
            if finite:
                means.append((depth * offset, mean_std(finite)[0]))
        if means:
            axis.plot(*zip(*means), linestyle=style, marker="o", color=colour, label=f"{label}, {regime}")
    axis.set_xscale("log", base=2)
    axis.set_xticks(depths, [f"{d}+{d}" for d in depths])
    axis.minorticks_off()
    axis.set_xlabel("depth (encoder + decoder layers)")
    axis.set_ylabel(ylabel)
    axis.set_title("mean over seeds (line), each seed (dots)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_validation_curves(rows: list[dict], path: Path) -> Path:
    """Validation loss against updates, one panel per regime, one colour per variant, one line per seed."""
    from ..diagnostics import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(REGIMES), figsize=(5 * len(REGIMES), 3.8), sharey=True, squeeze=False)
    for axis, regime in zip(axes[0], REGIMES):
        for index, label in enumerate(VARIANTS):
            seeds = [row for row in rows if (row["regime"], row["variant"]) == (regime, label)]
            for number, row in enumerate(seeds):
                points = [(record["step"], record["loss"]) for record in row["history"]]
                axis.plot(*zip(*points), color=f"C{index}", alpha=0.8, marker=".", markersize=3,
                          label=f"{label} ({len(seeds)} seeds)" if number == 0 else None)
        axis.set_title(f"{regime}", fontsize=10)
        axis.set_xlabel("update")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    for axis in axes[0]:
        if axis.get_lines():
            axis.legend(fontsize=8)
        else:  # a grid in progress: this regime has no finished run yet
            axis.text(0.5, 0.5, "no finished run yet", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["PRESETS", "VARIANTS", "prepare", "run_specs", "summarise"]
