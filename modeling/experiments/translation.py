"""The paper's variant set on translation (`rskip-reproduce translation`): Multi30k EN-DE offline, or the paper's data
from the Hub on GPUs (`--translation_preset iwslt15|wmt14`), mean ± std over seeds.

Every run is a `rskip-train-translation` run of the grid runner (`rskip.experiments.runner`): resumable, side by side,
the table rebuilt from the finished runs. `translation_args` and `shared_tokenizer` are also the stability and bn
experiments' way to build a translation run.
"""

from pathlib import Path

from ..training.reporting import plot_curves
from .runner import RunSpec, finished_row
from .summaries import fmt, mean_history, verdict
from .variants import ALL_VARIANTS, folder_label

# Where each --translation_preset's data is: offline files under --data_dir, or a Hub dataset.
DATA = {
    "multi30k": dict(train="multi30k/train", validation="multi30k/val", test="multi30k/test_2016_flickr",
                     source="en", target="de"),
    # GPU presets, from the Hub: IWSLT15 EN-VI (the paper's Transformer experiment) and WMT14 EN-DE (base vs big).
    "iwslt15": dict(dataset="mt_eng_vietnamese", config="iwslt2015-en-vi", source="en", target="vi"),
    "wmt14": dict(dataset="wmt/wmt14", config="de-en", source="en", target="de"),
}
# "mini" is the tests' size (seconds), "quick" a CPU's (minutes), "full" the paper's scale.
PRESETS = {
    "mini": dict(model="transformer-tiny", layers=1, steps=2, warmup=1, lr=1e-3, max_tokens=128, beams=1, vocab=120,
                 max_length=8, eval_samples=4, train_samples=64, variants=["post_ln", "rskip_ln K=2"]),
    "quick": dict(model="transformer-tiny", layers=3, steps=60, warmup=15, lr=3e-3, max_tokens=1024, beams=1,
                  eval_samples=150, max_length=30, evaluations=1, train_samples=10000,
                  variants=["post_ln", "xskip_ln λ=2", "rskip_ln K=2"]),
    "full": dict(model="transformer-small", layers=6, steps=20000, warmup=4000, lr=5e-4, max_tokens=4096,
                 beams=4, eval_samples=None, train_samples=None,
                 variants=["post_ln", "pre_ln", "xskip_ln λ=2", "rskip_ln K=2", "rskip_ln K=3"]),
}
# GPU presets of the translation experiment: the paper's data, transformer-base (wmt14: rSkip+LN base vs post-LN big).
WMT_OVERRIDES = {
    "iwslt15": dict(model="transformer-iwslt", layers=6, steps=50000, warmup=4000, lr=5e-4, max_tokens=4096,
                    beams=5, eval_samples=None),
    "wmt14": dict(model="transformer-base", layers=6, steps=100000, warmup=4000, lr=7e-4, max_tokens=8192, beams=4,
                  eval_samples=None, variants=["post_ln big", "post_ln", "rskip_ln K=2"]),
}
METRICS = [("validation", "bleu"), ("validation", "chrf"), ("validation", "loss"), ("test", "bleu"), ("test", "chrf")]


def with_data(preset: dict, data: str) -> dict:
    """`preset` for the translation data `data` (a key of DATA): the Hub presets bring their own model and schedule."""
    return dict(preset, data=data, **WMT_OVERRIDES.get(data, {}))


def translation_args(preset: dict, variant_flags: list[str], seed: int, data_dir: Path, tokenizer: Path | None,
                     layers: int | None = None, lr: float | None = None, warmup: int | None = None,
                     max_tokens: int | None = None, steps: int | None = None, evaluations: int = 2,
                     test: bool = True) -> list[str]:
    """The `rskip-train-translation` flags of one run of `preset` (its data: preset["data"], default multi30k),
    without --output_dir and the checkpoint flags, which the runner adds. `test`: also translate the test set."""
    source = DATA[preset.get("data", "multi30k")]
    layers = layers or preset["layers"]
    steps = steps or preset["steps"]
    if "dataset" in source:
        data_flags = ["--dataset_name", source["dataset"], "--dataset_config_name", source["config"]]
    else:
        data_flags = ["--train_file", str(data_dir / source["train"]), "--validation_file",
                      str(data_dir / source["validation"]),
                      *(["--test_file", str(data_dir / source["test"])] if test else [])]
    return [
        *data_flags, "--source_lang", source["source"], "--target_lang", source["target"],
        *(["--tokenizer_name", str(tokenizer)] if tokenizer else []),
        "--model_preset", preset["model"], "--config_overrides", f"encoder_layers={layers},decoder_layers={layers}",
        "--learning_rate", str(lr if lr is not None else preset["lr"]),
        "--num_warmup_steps", str(warmup if warmup is not None else preset["warmup"]),
        "--max_tokens", str(max_tokens or preset["max_tokens"]), "--max_train_steps", str(steps),
        "--eval_steps", str(max(steps // evaluations, 1)), "--num_beams", str(preset["beams"]),
        "--val_max_target_length", str(preset.get("max_length", 40)), "--seed", str(seed),
        *(["--max_eval_samples", str(preset["eval_samples"]), "--max_predict_samples", str(preset["eval_samples"])]
          if preset.get("eval_samples") else []),
        *(["--max_train_samples", str(preset["train_samples"])] if preset.get("train_samples") else []),
        *variant_flags,
    ]


def shared_tokenizer(data_dir: Path, output_dir: Path, vocab_size: int, train_samples: int | None) -> Path:
    """One SentencePiece tokenizer for every run of an experiment (Multi30k training data), trained once: a later
    sitting's runs read the same one."""
    from ..tokenization import train_marian_tokenizer
    from ..training.translation import read_pairs

    folder = output_dir / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        pairs, _ = read_pairs(str(data_dir / DATA["multi30k"]["train"]), "en", "de")
        if train_samples:
            pairs = pairs.select(range(min(train_samples, len(pairs))))
        train_marian_tokenizer(pairs["source"][:], pairs["target"][:], folder, vocab_size=vocab_size,
                               source_lang="en", target_lang="de")
    return folder


def prepare(preset: dict, output_dir: Path, data_dir: Path) -> tuple[Path, Path | None]:
    """What `run_specs` takes: the data folder and, for Multi30k, the tokenizer every run shares (Hub data: none,
    each run trains its own)."""
    if preset.get("data", "multi30k") != "multi30k":
        return data_dir, None
    vocab = preset.get("vocab") or (2000 if preset["model"] == "transformer-tiny" else 8000)
    return data_dir, shared_tokenizer(data_dir, output_dir, vocab, preset.get("train_samples"))


def run_specs(preset: dict, seeds: int, data_dir: Path, tokenizer: Path | None) -> list[RunSpec]:
    """Every variant's seeds, the reference variant first."""
    return [RunSpec(f"{folder_label(label)}-seed{seed}", "translation",
                    tuple(translation_args(preset, ALL_VARIANTS[label], seed, data_dir, tokenizer,
                                           evaluations=preset.get("evaluations", 2))),
                    {"variant": label, "seed": seed})
            for label in preset["variants"] for seed in range(seeds)]


def summarise_run(spec: RunSpec, folder: Path) -> dict | None:
    """One finished run's row (None while unfinished): its scores, or where it diverged."""
    if (finished := finished_row(spec, folder)) is None:
        return None
    row, result = finished
    if "diverged" in row:
        return row
    row.update(train_s=result["train_runtime_s"], history=result["history"])
    for split, name in (*METRICS, ("test", "loss")):
        if name in result.get(split, {}):
            row[f"{split}_{name}"] = result[split][name]
    return row


def summarise(preset: dict, seeds: int, output_dir: Path, specs: list[RunSpec], family: str = "translation") -> dict:
    """The table and curves of the finished runs, rebuilt from their folders; `family` names the figure and the note."""
    rows = [row for spec in specs if (row := summarise_run(spec, output_dir / "runs" / spec.name)) is not None]
    reference = preset["variants"][0]
    lines = ["| variant | runs | " + " | ".join(f"{split} {name}" for split, name in METRICS)
             + f" | valid loss vs {reference} | test BLEU vs {reference} | train s |",
             "|---|---:|" + "---:|" * (len(METRICS) + 3)]
    for label in preset["variants"]:
        chosen = [row for row in rows if row["variant"] == label]
        base = [row for row in rows if row["variant"] == reference]
        cells = [fmt([row.get(f"{split}_{name}") for row in chosen], 3 if name == "loss" else 2)
                 for split, name in METRICS]
        compared = verdict([row.get("test_bleu") for row in chosen], [row.get("test_bleu") for row in base])
        compared_loss = verdict([row.get("validation_loss") for row in chosen],
                                [row.get("validation_loss") for row in base], higher_is_better=False)
        diverged = sum("diverged" in row for row in chosen)
        lines.append(f"| {label} | {len(chosen)} of {seeds}{f' ({diverged} diverged)' if diverged else ''} | "
                     + " | ".join(cells) + f" | {'—' if label == reference else compared_loss} | "
                     f"{'—' if label == reference else compared} | {fmt([row.get('train_s') for row in chosen], 0)} |")
    histories = {label: mean_history([row["history"] for row in rows if row["variant"] == label and row.get("history")])
                 for label in preset["variants"]}
    # no figure until a run has finished with a history (a partial grid, or every run diverged)
    figures = [plot_curves({label: history for label, history in histories.items() if history},
                           ["loss", "bleu", "chrf"], output_dir / f"{family}_curves.png")] if any(histories.values()) else []
    note = (f"{family}: {preset['model']} with {preset['layers']}+{preset['layers']} layers, {preset['steps']} "
            f"updates of ≤ {preset['max_tokens']} tokens, peak rate {preset['lr']}, {preset['warmup']} warm-up "
            f"updates, beam {preset['beams']}, validation and test on {preset.get('eval_samples') or 'all'} "
            f"sentences; BLEU and chrF by sacreBLEU. Runs: the finished seeds (n of {seeds}).")
    return {"rows": rows, "finished": len(rows), "planned": len(specs),
            "total_train_s": sum(row.get("train_s") or 0 for row in rows), "note": note, "table": "\n".join(lines),
            "figures": [figure.name for figure in figures]}


__all__ = ["DATA", "PRESETS", "WMT_OVERRIDES", "prepare", "run_specs", "shared_tokenizer", "summarise",
           "translation_args", "with_data"]
