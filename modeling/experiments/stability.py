"""Depth × peak rate × warm-up on Multi30k (`rskip-reproduce stability`): does a run train, stall or diverge?

Every run is a short `rskip-train-translation` run of the grid runner (`rskip.experiments.runner`): resumable, side
by side, the table rebuilt from the finished runs. Translations are not scored: the final validation loss decides, by
the rule of `depth_rules.outcome_of`.
"""

import functools
from pathlib import Path

from .depth_rules import divergence_threshold, outcome_of
from .runner import RunSpec, read_outcome
from .summaries import fmt, text_unigram_loss
from .translation import shared_tokenizer, translation_args
from .variants import ALL_VARIANTS, STABILITY_VARIANTS, folder_label

# "mini" is the tests' size (seconds), "quick" a CPU's (minutes), "full" the paper's scale. rates: (peak, warm-up).
PRESETS = {
    "mini": dict(depths=[1], rates=[(1e-3, 1)], steps=2, max_tokens=128, eval_samples=4, vocab=120, max_length=8,
                 variants=["post_ln", "rskip_ln K=2"], train_samples=64),
    "quick": dict(depths=[6, 12], rates=[(1e-3, 30), (1e-2, 0)], steps=60, max_tokens=512, eval_samples=100,
                  max_length=8,  # the loss decides; translations are not scored
                  variants=list(STABILITY_VARIANTS), train_samples=10000),
    "full": dict(depths=[6, 12, 24, 48], rates=[(5e-4, 4000), (1e-3, 4000), (1e-3, 400), (2e-3, 400), (1e-3, 0)],
                 steps=20000, max_tokens=8192, eval_samples=None, variants=list(STABILITY_VARIANTS),
                 train_samples=None),
}
DEFAULT_VOCAB = 2000


def prepare(preset: dict, output_dir: Path, data_dir: Path) -> tuple[Path, Path]:
    """What `run_specs` takes: the data folder and the tokenizer every run shares, trained once."""
    return data_dir, shared_tokenizer(data_dir, output_dir, preset.get("vocab", DEFAULT_VOCAB),
                                      preset.get("train_samples"))


def run_specs(preset: dict, seeds: int, data_dir: Path, tokenizer: Path) -> list[RunSpec]:
    """One run per depth, rate, variant and seed: transformer-tiny, greedy, one evaluation at the end, no test set."""
    base = dict(model="transformer-tiny", beams=1, eval_samples=preset["eval_samples"],
                max_length=preset.get("max_length", 40), train_samples=preset["train_samples"], layers=1, lr=1e-3,
                warmup=0)
    return [RunSpec(f"d{depth}-lr{lr:g}-w{warmup}-{folder_label(label)}-seed{seed}", "translation",
                    tuple(translation_args(base, ALL_VARIANTS[label], seed, data_dir, tokenizer, layers=depth, lr=lr,
                                           warmup=warmup, max_tokens=preset["max_tokens"], steps=preset["steps"],
                                           evaluations=1, test=False)),
                    {"depth": depth, "lr": lr, "warmup": warmup, "variant": label, "seed": seed})
            for depth in preset["depths"] for lr, warmup in preset["rates"] for label in preset["variants"]
            for seed in range(seeds)]


def reference_losses(preset: dict, tokenizer: Path, spec: RunSpec) -> tuple[float, float]:
    """(stalled_above, diverged_above): the unigram loss on the validation data the runs use (their --train_file
    and --validation_file, in full), and ln(vocabulary) + 1."""
    files = [spec.argv[spec.argv.index(flag) + 1] for flag in ("--train_file", "--validation_file")]
    return multi30k_unigram_loss(tokenizer, *files), divergence_threshold(preset.get("vocab", DEFAULT_VOCAB))


@functools.lru_cache
def multi30k_unigram_loss(tokenizer: Path, train_file: str, validation_file: str) -> float:
    """`summaries.text_unigram_loss` on German targets of PREFIX.{en,de} files; cached, as the tables are rebuilt after
    every finished run."""
    from ..training.translation import read_pairs

    targets = [read_pairs(prefix, "en", "de")[0]["target"][:] for prefix in (train_file, validation_file)]
    return text_unigram_loss(tokenizer, *targets)


def summarise(preset: dict, seeds: int, output_dir: Path, specs: list[RunSpec]) -> dict:
    """The table of the finished runs' outcomes, rebuilt from their folders."""
    stalled_above, diverged_above = reference_losses(preset, output_dir / "tokenizer", specs[0])
    rows = []
    for spec in specs:
        result = read_outcome(output_dir / "runs" / spec.name)
        if result is None:
            continue
        final = result["history"][-1]["loss"] if "history" in result else None  # None: diverged
        rows.append({**spec.settings, "run": spec.name, "final_loss": final,
                     "outcome": outcome_of(final, stalled_above, diverged_above), "command": result.get("command"),
                     "train_s": result.get("train_runtime_s")})
    lines = ["| depth | peak rate | warm-up | " + " | ".join(preset["variants"]) + " |",
             "|---:|---:|---:|" + "---|" * len(preset["variants"])]
    for depth in preset["depths"]:
        for lr, warmup in preset["rates"]:
            cells = []
            for label in preset["variants"]:
                chosen = [row for row in rows
                          if (row["depth"], row["lr"], row["warmup"], row["variant"]) == (depth, lr, warmup, label)]
                outcomes = "/".join(sorted({row["outcome"] for row in chosen})) or "—"
                cells.append(f"{outcomes} ({fmt([row['final_loss'] for row in chosen], 2)}; n={len(chosen)})")
            lines.append(f"| {depth}+{depth} | {lr:g} | {warmup} | " + " | ".join(cells) + " |")
    note = (f"stability: transformer-tiny (d = 64), {preset['steps']} updates of ≤ {preset['max_tokens']} tokens "
            f"of Multi30k, inverse-sqrt schedule, gradient clipping at 1. Cells: outcome (final validation loss "
            f"per token, mean ± std over the finished seeds; n of {seeds}). diverges: a non-finite loss, or a final "
            f"validation loss above ln(vocabulary) + 1 = {diverged_above:.2f} (clearly worse than uniform); stalls: "
            f"not below {stalled_above:.2f}, the loss of a model that knows only the target tokens' frequencies; "
            f"trains: below it.")
    return {"rows": rows, "finished": len(rows), "planned": len(specs), "unigram_loss": stalled_above,
            "diverged_above": diverged_above, "total_train_s": sum(row.get("train_s") or 0 for row in rows),
            "note": note, "table": "\n".join(lines), "figures": []}


__all__ = ["PRESETS", "prepare", "run_specs", "summarise"]
