"""Where rSkip+LN pays off: one command per experiment, each writing results.md, results.json and PNGs.

    rskip-reproduce gradients   [--quick | --full] [--seeds N]   # gradient norms at initialisation
    rskip-reproduce stability   ...   # depth x peak rate x warm-up: trains, stalls or diverges
    rskip-reproduce translation ...   # the paper's variant set on Multi30k EN-DE, mean ± std over seeds
    rskip-reproduce cifar       ...   # PreAct-ResNets on CIFAR-10
    rskip-reproduce bn          ...   # BatchNorm in place of LayerNorm, both families
    rskip-reproduce depth       [--workers N]   # depth x rate regime on the number task, trained to the end

`depth` is a resumable grid (`rskip.experiments.runner`): each run has its folder under `<output_dir>/runs`, runs go
side by side (`--workers`, one per core by default, one thread each), and the same command run again skips finished
runs and resumes interrupted ones, rebuilding results.md, results.json and the plots from every finished run.

`--quick` (the default) is sized for a few minutes on 2 CPU cores: small models, short runs, a subset of the data;
`--full` is the paper-scale recipe, for GPUs (`--translation_preset iwslt15|wmt14` selects the translation data of
the paper; those need the Hub). Training runs go through `rskip.training.train` with the training commands' own command lines
(each run's command is in results.json); the gradient experiment measures `rskip.diagnostics.measure` at
initialisation. A difference between two variants smaller than the larger of their standard deviations over seeds
is reported as no difference.
"""

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from rskip import CifarPreActResNet, ResNetSkipOptions, RSkipMarianConfig, RSkipMarianMTModel, SkipOptions
from rskip.experiments import cifar_converged, depth_map
from rskip.experiments.runner import run_grid
from rskip.experiments.summaries import fmt, mean_std, verdict
from rskip.experiments.variants import (
    ALL_VARIANTS,
    BN_VARIANTS,
    CIFAR_VARIANTS,
    GRADIENT_VARIANTS,
    STABILITY_VARIANTS,
    TRANSLATION_VARIANTS,
)
from rskip.diagnostics import measure, plot_by_depth, plot_layers, random_batch
from rskip.training import TrainingConfig, TrainingError, train
from rskip.training.cli import (
    COUNT,
    CommandParser,
    output_folder,
    parse_image_classification_args,
    parse_translation_args,
    run_main,
)
from rskip.training.image_classification import ImageClassificationTask
from rskip.training.reporting import plot_curves
from rskip.training.translation import MODEL_PRESETS, TranslationTask

# The offline data beside a clone of the repository (run from its root, as `make` does).
DATA = Path("..") / "shared" / "data"


# Sizes per experiment and preset. "mini" is the tests' (seconds), "quick" a CPU's, "full" the paper's scale.
TRANSLATION_DATA = {
    "multi30k": dict(train="multi30k/train", validation="multi30k/val", test="multi30k/test_2016_flickr",
                     source="en", target="de"),
    # GPU presets, from the Hub: IWSLT15 EN-VI (the paper's Transformer experiment) and WMT14 EN-DE (base vs big).
    "iwslt15": dict(dataset="mt_eng_vietnamese", config="iwslt2015-en-vi", source="en", target="vi"),
    "wmt14": dict(dataset="wmt/wmt14", config="de-en", source="en", target="de"),
}
PRESETS = {
    "gradients": {
        "mini": dict(depths=[3, 6], variants=["xskip λ=0.5", "rskip_ln K=2"], batch=2, length=4, image_size=8),
        "quick": dict(depths=[6, 12, 24, 48], variants=list(GRADIENT_VARIANTS), batch=8, length=16),
        "full": dict(depths=[6, 12, 24, 48, 96], variants=list(GRADIENT_VARIANTS), batch=32, length=32),
    },
    "stability": {
        "mini": dict(depths=[1], rates=[(1e-3, 1)], steps=2, max_tokens=128, eval_samples=4, vocab=120, max_length=8,
                     variants=["post_ln", "rskip_ln K=2"], train_samples=64),
        "quick": dict(depths=[6, 12], rates=[(1e-3, 30), (1e-2, 0)], steps=60, max_tokens=512, eval_samples=100,
                      max_length=8,  # the loss decides; translations are not scored
                      variants=list(STABILITY_VARIANTS), train_samples=10000),
        "full": dict(depths=[6, 12, 24, 48], rates=[(5e-4, 4000), (1e-3, 4000), (1e-3, 400), (2e-3, 400), (1e-3, 0)],
                     steps=20000, max_tokens=8192, eval_samples=None, variants=list(STABILITY_VARIANTS),
                     train_samples=None),
    },
    "translation": {
        "mini": dict(model="transformer-tiny", layers=1, steps=2, warmup=1, lr=1e-3, max_tokens=128, beams=1, vocab=120,
                     max_length=8,
                     eval_samples=4, train_samples=64, variants=["post_ln", "rskip_ln K=2"]),
        "quick": dict(model="transformer-tiny", layers=3, steps=60, warmup=15, lr=3e-3, max_tokens=1024, beams=1,
                      eval_samples=150, max_length=30, evaluations=1, train_samples=10000,
                      variants=["post_ln", "xskip_ln λ=2", "rskip_ln K=2"]),
        "full": dict(model="transformer-small", layers=6, steps=20000, warmup=4000, lr=5e-4, max_tokens=4096,
                     beams=4, eval_samples=None, train_samples=None,
                     variants=["post_ln", "pre_ln", "xskip_ln λ=2", "rskip_ln K=2", "rskip_ln K=3"]),
    },
    "cifar": {
        "mini": dict(models=["preact_resnet20"], steps=2, batch=8, train_samples=32, eval_samples=16, validation_size=16,
                     variants=["plain", "rskip_ln K=2"]),
        # --models preact_resnet20 preact_resnet56 for both; -56 alone takes about three times -20's time.
        "quick": dict(models=["preact_resnet20"], steps=100, batch=64, train_samples=10000, eval_samples=1000,
                      variants=list(CIFAR_VARIANTS)),
        "full": dict(models=["preact_resnet110"], steps=64000, batch=128, train_samples=None, eval_samples=None,
                     variants=list(CIFAR_VARIANTS)),
    },
}
PRESETS["bn"] = {
    "mini": dict(translation=dict(PRESETS["translation"]["mini"], variants=["xskip_ln λ=2", "xskip_bn λ=2"]),
                 cifar=dict(PRESETS["cifar"]["mini"], variants=["xskip_ln λ=2", "xskip_bn λ=2"])),
    "quick": dict(translation=dict(PRESETS["translation"]["quick"], steps=40, eval_samples=100,
                                   variants=["rskip_ln K=2", "rskip_bn K=2"]),
                  cifar=dict(PRESETS["cifar"]["quick"], steps=10, batch=32, train_samples=2000, eval_samples=500,
                             variants=list(BN_VARIANTS))),
    "full": dict(translation=dict(PRESETS["translation"]["full"], variants=list(BN_VARIANTS)),
                 cifar=dict(PRESETS["cifar"]["full"], variants=list(BN_VARIANTS))),
}


def hardware(threads: int | None = None) -> str:
    """The machine; `threads`: the torch threads of each run (default: this process's)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {threads or torch.get_num_threads()} torch thread(s)"


# ------------------------------------------------------------------------------------------------ gradients

def marian_at_depth(depth: int, flags: list[str], vocab_size: int = 1000) -> RSkipMarianMTModel:
    options = SkipOptions(**dict(zip([flag[2:] for flag in flags[::2]], [_value(v) for v in flags[1::2]])))
    config = RSkipMarianConfig(**{**MODEL_PRESETS["transformer-tiny"], "encoder_layers": depth,
                                  "decoder_layers": depth}, **options.to_dict(), vocab_size=vocab_size,
                               pad_token_id=vocab_size - 1, decoder_start_token_id=vocab_size - 1,
                               max_position_embeddings=64)  # Marian fills its sinusoids in Python: keep them few
    return RSkipMarianMTModel(config)


def resnet_at_depth(depth: int, flags: list[str]) -> CifarPreActResNet:
    """A CIFAR PreAct-ResNet with `depth` residual blocks (depth / 3 per stage: PreAct-ResNet-(2·depth + 2))."""
    options = ResNetSkipOptions(**dict(zip([flag[2:] for flag in flags[::2]], [_value(v) for v in flags[1::2]])))
    return CifarPreActResNet(layers=(max(depth // 3, 1),) * 3, skip_options=options)


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_gradients(preset: dict, seeds: int, output_dir: Path, notes: list[str]) -> dict:
    records = []
    reports_at_depth = {}
    for family, build in {"transformer": marian_at_depth, "resnet": resnet_at_depth}.items():
        for depth in preset["depths"]:
            for label in preset["variants"]:
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    model = build(depth, ALL_VARIANTS[label])
                    batch = random_batch(model, preset["batch"], preset["length"],
                                         image_size=preset.get("image_size", 32), seed=seed)
                    report = measure(model, batch)
                    for stack, summary in report["stacks"].items():
                        records.append({"family": family, "stack": stack, "depth": depth, "variant": label,
                                        "seed": seed, "gradient_ratio": summary["gradient_ratio"],
                                        "mean_grad_norm": statistics.fmean(summary["grad_norms"]),
                                        "output_change": report["output_change"],
                                        "relative_output_change": report["relative_output_change"]})
                    if seed == 0:
                        reports_at_depth[(family, depth, label)] = report
    # Plots: gradient ratio and output change against depth; gradient norm against layer at the largest depth.
    figures = []
    deepest = max(preset["depths"])
    for family, stack in (("transformer", "encoder"), ("transformer", "decoder"), ("resnet", "blocks")):
        series = {label: {depth: mean_std([r["gradient_ratio"] for r in records if r["family"] == family and
                                           r["stack"] == stack and r["depth"] == depth and r["variant"] == label])[0]
                          for depth in preset["depths"]} for label in preset["variants"]}
        figures.append(plot_by_depth(series, output_dir / f"gradient_ratio_{family}_{stack}.png",
                                     "first / last sublayer gradient norm", f"{family} {stack}, at initialisation"))
    for family in ("transformer", "resnet"):
        series = {label: {depth: mean_std([r["output_change"] for r in records if r["family"] == family and
                                           r["depth"] == depth and r["variant"] == label])[0]
                          for depth in preset["depths"]} for label in preset["variants"]}
        figures.append(plot_by_depth(series, output_dir / f"output_change_{family}.png",
                                     "RMS output change, one Adam step (η=1e-3)", f"{family}, at initialisation"))
        figures.append(plot_layers({label: reports_at_depth[(family, deepest, label)] for label in preset["variants"]},
                                   output_dir / f"layers_{family}_depth{deepest}.png",
                                   f"{family}, depth {deepest}, at initialisation"))

    lines = []
    for family, stack in (("transformer", "encoder"), ("transformer", "decoder"), ("resnet", "blocks")):
        lines += [f"\n### {family}, {stack}: first / last sublayer gradient norm (mean over {seeds} seed(s))\n",
                  "| variant | " + " | ".join(f"depth {d}" for d in preset["depths"]) + " |",
                  "|---|" + "---:|" * len(preset["depths"])]
        for label in preset["variants"]:
            cells = [mean_std([r["gradient_ratio"] for r in records if r["family"] == family and r["stack"] == stack
                               and r["depth"] == d and r["variant"] == label])[0] for d in preset["depths"]]
            lines.append(f"| {label} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    for family in ("transformer", "resnet"):
        lines += [f"\n### {family}: RMS output change under one Adam step (η = 1e-3), and the mean sublayer gradient "
                  f"norm (encoder / blocks)\n",
                  "| variant | " + " | ".join(f"depth {d}" for d in preset["depths"]) + " |",
                  "|---|" + "---:|" * len(preset["depths"])]
        first_stack = "encoder" if family == "transformer" else "blocks"
        for label in preset["variants"]:
            cells = []
            for d in preset["depths"]:
                chosen = [r for r in records if r["family"] == family and r["stack"] == first_stack
                          and r["depth"] == d and r["variant"] == label]
                cells.append(f"{mean_std([r['output_change'] for r in chosen])[0]:.3g} / "
                             f"{mean_std([r['mean_grad_norm'] for r in chosen])[0]:.3g}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes.append("Gradients of the mean cross-entropy on a random batch (transformer-tiny, d = 64, a depth of D means "
                 "D encoder and D decoder layers; CIFAR PreAct-ResNets with D blocks, 8 random 32×32 images), at "
                 "initialisation. A ratio far from 1 means the first sublayers get a vanishing (< 1) or exploding "
                 "(> 1) share of the gradient; NaN means the gradients overflowed.")
    return {"records": records, "table": "\n".join(lines), "figures": [f.name for f in figures]}


# ---------------------------------------------------------------------------------------------- translation

def translation_args(preset: dict, variant_flags: list[str], seed: int, output_dir: Path, data_dir: Path,
                     tokenizer: Path | None, data: str = "multi30k", layers: int | None = None, lr: float | None = None,
                     warmup: int | None = None, max_tokens: int | None = None, steps: int | None = None,
                     diagnostics: str | None = None, evaluations: int = 2) -> list[str]:
    source = TRANSLATION_DATA[data]
    layers = layers or preset["layers"]
    steps = steps or preset["steps"]
    if "dataset" in source:
        data_flags = ["--dataset_name", source["dataset"], "--dataset_config_name", source["config"]]
    else:
        data_flags = ["--train_file", str(data_dir / source["train"]), "--validation_file",
                      str(data_dir / source["validation"]), "--test_file", str(data_dir / source["test"])]
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
        *(["--diagnostics_steps", diagnostics] if diagnostics else []),
        "--output_dir", str(output_dir), "--overwrite_output_dir", *variant_flags,
    ]


def train_translation(argv: list[str]) -> dict:
    """One train_translation.py run, in this process; a diverged run returns {"diverged": message}."""
    args = parse_translation_args(argv)
    try:
        return train(TranslationTask(args), TrainingConfig.from_args(args),
                     shlex.join(["python", "rskip-train-translation", *argv]))
    except TrainingError as error:
        return {"diverged": str(error), "command": shlex.join(["python", "rskip-train-translation", *argv])}


def shared_tokenizer(data_dir: Path, output_dir: Path, vocab_size: int, train_samples: int | None) -> Path:
    """One SentencePiece tokenizer for every run of an experiment (Multi30k training data), trained once."""
    from rskip.tokenization import train_marian_tokenizer
    from rskip.training.translation import read_pairs

    folder = output_dir / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        pairs, _ = read_pairs(str(data_dir / "multi30k" / "train"), "en", "de")
        if train_samples:
            pairs = pairs.select(range(min(train_samples, len(pairs))))
        train_marian_tokenizer(pairs["source"][:], pairs["target"][:], folder, vocab_size=vocab_size,
                               source_lang="en", target_lang="de")
    return folder


def unigram_loss(tokenizer_dir: Path, data_dir: Path) -> float:
    """The validation cross-entropy per target token of a model that has learned the target tokens' frequencies
    (from the training data) and nothing else: the line between a run that stalls and one that trains."""
    from collections import Counter

    from transformers import AutoTokenizer

    from rskip.training.translation import read_pairs

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_pairs, _ = read_pairs(str(data_dir / "multi30k" / "train"), "en", "de")
    valid_pairs, _ = read_pairs(str(data_dir / "multi30k" / "val"), "en", "de")
    counts = Counter(token for ids in tokenizer(text_target=train_pairs["target"][:])["input_ids"] for token in ids)
    total = sum(counts.values())
    valid = [token for ids in tokenizer(text_target=valid_pairs["target"][:])["input_ids"] for token in ids]
    return -statistics.fmean(math.log((counts[token] + 1) / (total + len(tokenizer))) for token in valid)


def run_translation_grid(preset: dict, seeds: int, output_dir: Path, data_dir: Path, notes: list[str],
                         data: str = "multi30k", family: str = "translation") -> dict:
    vocab = preset.get("vocab") or (2000 if preset["model"] == "transformer-tiny" else 8000)
    tokenizer = shared_tokenizer(data_dir, output_dir, vocab, preset.get("train_samples")) if data == "multi30k" else None
    runs = []
    for label in preset["variants"]:
        for seed in range(seeds):
            run_dir = output_dir / "runs" / f"{label.replace(' ', '_')}-seed{seed}"
            flags = ALL_VARIANTS[label]
            result = train_translation(translation_args(preset, flags, seed, run_dir, data_dir, tokenizer, data,
                                                        evaluations=preset.get("evaluations", 2)))
            runs.append({"variant": label, "seed": seed, **summarise_translation(result)})
    metrics = [("validation", "bleu"), ("validation", "chrf"), ("validation", "loss"), ("test", "bleu"),
               ("test", "chrf")]
    reference = preset["variants"][0]
    lines = ["| variant | " + " | ".join(f"{split} {name}" for split, name in metrics)
             + f" | valid loss vs {reference} | test BLEU vs {reference} | train s |",
             "|---|" + "---:|" * (len(metrics) + 3)]
    for label in preset["variants"]:
        chosen = [run for run in runs if run["variant"] == label]
        cells = [fmt([run.get(f"{split}_{name}") for run in chosen], 3 if name == "loss" else 2)
                 for split, name in metrics]
        compared = verdict([run.get("test_bleu") for run in chosen],
                           [run.get("test_bleu") for run in runs if run["variant"] == reference])
        compared_loss = verdict([run.get("validation_loss") for run in chosen],
                                [run.get("validation_loss") for run in runs if run["variant"] == reference],
                                higher_is_better=False)
        diverged = sum("diverged" in run for run in chosen)
        lines.append(f"| {label}{f' ({diverged} diverged)' if diverged else ''} | " + " | ".join(cells)
                     + f" | {'—' if label == reference else compared_loss} | {'—' if label == reference else compared} | {fmt([run.get('train_s') for run in chosen], 0)} |")
    histories = {label: mean_history([run["history"] for run in runs if run["variant"] == label and run.get("history")])
                 for label in preset["variants"]}
    figure = plot_curves(histories, ["loss", "bleu", "chrf"], output_dir / f"{family}_curves.png")
    notes.append(f"{family}: {preset['model']} with {preset['layers']}+{preset['layers']} layers, {preset['steps']} "
                 f"updates of ≤ {preset['max_tokens']} tokens, peak rate {preset['lr']}, {preset['warmup']} warm-up "
                 f"updates, beam {preset['beams']}, validation and test on "
                 f"{preset.get('eval_samples') or 'all'} sentences; BLEU and chrF by sacreBLEU.")
    return {"runs": runs, "table": "\n".join(lines), "figures": [figure.name]}


def summarise_translation(result: dict) -> dict:
    if "diverged" in result:
        return {"diverged": result["diverged"], "command": result["command"]}
    summary = {"command": result["command"], "train_s": result["train_runtime_s"], "history": result["history"]}
    for split in ("validation", "test"):
        for name in ("bleu", "chrf", "loss"):
            if name in result.get(split, {}):
                summary[f"{split}_{name}"] = result[split][name]
    return summary


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """The records of several seeds' validation histories averaged step by step."""
    steps = sorted({record["step"] for history in histories for record in history})
    return [{"step": step, **{name: statistics.fmean(record[name] for history in histories for record in history
                                                     if record["step"] == step)
                              for name in ("loss", "bleu", "chrf", "top1") if any(
                name in record for history in histories for record in history if record["step"] == step)}}
            for step in steps]


def run_translation(preset: dict, seeds: int, output_dir: Path, data_dir: Path, notes: list[str],
                    data: str = "multi30k") -> dict:
    return run_translation_grid(preset, seeds, output_dir, data_dir, notes, data)


# ------------------------------------------------------------------------------------------------ stability

def run_stability(preset: dict, seeds: int, output_dir: Path, data_dir: Path, notes: list[str]) -> dict:
    vocab = preset.get("vocab", 2000)
    tokenizer = shared_tokenizer(data_dir, output_dir, vocab, preset.get("train_samples"))
    stalled_above = unigram_loss(tokenizer, data_dir)
    diverged_above = math.log(vocab) + 1.0
    base = dict(model="transformer-tiny", beams=1, eval_samples=preset["eval_samples"], max_length=preset.get("max_length", 40),
                train_samples=preset["train_samples"], layers=1, lr=1e-3, warmup=0)
    cells = []
    for depth in preset["depths"]:
        for lr, warmup in preset["rates"]:
            for label in preset["variants"]:
                for seed in range(seeds):
                    run_dir = output_dir / "runs" / f"d{depth}-lr{lr}-w{warmup}-{label.replace(' ', '_')}-seed{seed}"
                    argv = translation_args(base, ALL_VARIANTS[label], seed, run_dir, data_dir, tokenizer,
                                            layers=depth, lr=lr, warmup=warmup, max_tokens=preset["max_tokens"],
                                            steps=preset["steps"], evaluations=1)
                    argv.remove("--test_file")
                    argv.remove(str(data_dir / TRANSLATION_DATA["multi30k"]["test"]))
                    result = train_translation(argv)
                    loss = result.get("validation", {}).get("loss") if "diverged" not in result else None
                    final = result["history"][-1]["loss"] if "history" in result else None
                    if loss is None or not math.isfinite(final) or final > diverged_above:
                        outcome = "diverges"
                    elif final >= stalled_above:
                        outcome = "stalls"
                    else:
                        outcome = "trains"
                    cells.append({"depth": depth, "lr": lr, "warmup": warmup, "variant": label, "seed": seed,
                                  "final_loss": final, "outcome": outcome, "command": result["command"],
                                  "train_s": result.get("train_runtime_s")})
    lines = ["| depth | peak rate | warm-up | " + " | ".join(preset["variants"]) + " |",
             "|---:|---:|---:|" + "---|" * len(preset["variants"])]
    for depth in preset["depths"]:
        for lr, warmup in preset["rates"]:
            row = []
            for label in preset["variants"]:
                chosen = [c for c in cells if (c["depth"], c["lr"], c["warmup"], c["variant"]) == (depth, lr, warmup, label)]
                outcomes = sorted({c["outcome"] for c in chosen})
                row.append(f"{'/'.join(outcomes)} ({fmt([c['final_loss'] for c in chosen], 2)})")
            lines.append(f"| {depth}+{depth} | {lr:g} | {warmup} | " + " | ".join(row) + " |")
    notes.append(f"stability: transformer-tiny (d = 64), {preset['steps']} updates of ≤ {preset['max_tokens']} tokens "
                 f"of Multi30k, inverse-sqrt schedule, gradient clipping at 1. Cells: outcome (final validation loss "
                 f"per token, mean ± std over seeds). diverges: a non-finite loss, or a final validation loss above "
                 f"ln(vocabulary) + 1 = {diverged_above:.2f} (clearly worse than uniform); stalls: not below {stalled_above:.2f}, "
                 f"the loss of a model that knows only the target tokens' frequencies; trains: below it.")
    return {"cells": cells, "table": "\n".join(lines), "figures": [], "unigram_loss": stalled_above}


# -------------------------------------------------------------------------------------------------- CIFAR-10

def cifar_args(preset: dict, model: str, variant_flags: list[str], seed: int, output_dir: Path,
               data_dir: Path) -> list[str]:
    return [
        "--train_file", str(data_dir / "cifar10" / "train.parquet"),
        "--validation_size", str(preset.get("validation_size", 5000)),
        "--model", model, "--per_device_train_batch_size", str(preset["batch"]),
        "--max_train_steps", str(preset["steps"]), "--eval_steps", str(max(preset["steps"] // 2, 1)),
        *(["--max_train_samples", str(preset["train_samples"])] if preset.get("train_samples") else []),
        *(["--max_eval_samples", str(preset["eval_samples"])] if preset.get("eval_samples") else []),
        *(["--num_warmup_steps", "0"] if preset["steps"] < 1000 else []),
        "--seed", str(seed), "--output_dir", str(output_dir), "--overwrite_output_dir", *variant_flags,
    ]


def run_cifar(preset: dict, seeds: int, output_dir: Path, data_dir: Path, notes: list[str],
              family: str = "cifar") -> dict:
    runs = []
    for model in preset["models"]:
        for label in preset["variants"]:
            for seed in range(seeds):
                run_dir = output_dir / "runs" / f"{model}-{label.replace(' ', '_')}-seed{seed}"
                argv = cifar_args(preset, model, ALL_VARIANTS[label], seed, run_dir, data_dir)
                args = parse_image_classification_args(argv)
                command = shlex.join(["python", "rskip-train-image-classification", *argv])
                try:
                    result = train(ImageClassificationTask(args), TrainingConfig.from_args(args), command)
                    runs.append({"model": model, "variant": label, "seed": seed, "command": command,
                                 "top1": result["validation"]["top1"], "loss": result["validation"]["loss"],
                                 "train_s": result["train_runtime_s"], "history": result["history"]})
                except TrainingError as error:
                    runs.append({"model": model, "variant": label, "seed": seed, "command": command,
                                 "diverged": str(error)})
    reference = preset["variants"][0]
    lines = [f"| model | variant | validation top-1 (%) | validation loss | top-1 vs {reference} | train s |",
             "|---|---|---:|---:|---|---:|"]
    figures = []
    for model in preset["models"]:
        for label in preset["variants"]:
            chosen = [run for run in runs if run["model"] == model and run["variant"] == label]
            base = [run.get("top1") for run in runs if run["model"] == model and run["variant"] == reference]
            diverged = sum("diverged" in run for run in chosen)
            lines.append(f"| {model} | {label}{f' ({diverged} diverged)' if diverged else ''} | "
                         f"{fmt([run.get('top1') for run in chosen])} | {fmt([run.get('loss') for run in chosen], 3)} | "
                         f"{'—' if label == reference else verdict([run.get('top1') for run in chosen], base)} | "
                         f"{fmt([run.get('train_s') for run in chosen], 0)} |")
        histories = {label: mean_history([run["history"] for run in runs if run["model"] == model
                                          and run["variant"] == label and run.get("history")])
                     for label in preset["variants"]}
        figures.append(plot_curves(histories, ["loss", "top1"], output_dir / f"{family}_{model}_curves.png"))
    used = f" ({preset['eval_samples']} of them used)" if preset.get("eval_samples") else ""
    subset = f" from the first {preset['train_samples']}" if preset.get("train_samples") else ""
    notes.append(f"{family}: CIFAR-10, the last {preset.get('validation_size', 5000):,} training images held out for validation{used}; "
                 f"{preset['steps']} updates of {preset['batch']} images{subset}, SGD with momentum, peak rate 0.1, "
                 f"step schedule, He et al.'s crop-and-flip augmentation.")
    return {"runs": runs, "table": "\n".join(lines), "figures": [figure.name for figure in figures]}


# -------------------------------------------------------------------------------------------------------- BN

def run_bn(preset: dict, seeds: int, output_dir: Path, data_dir: Path, notes: list[str]) -> dict:
    translation = run_translation_grid(preset["translation"], seeds, output_dir / "translation", data_dir, notes,
                                       family="bn_translation")
    cifar = run_cifar(preset["cifar"], seeds, output_dir / "cifar", data_dir, notes, family="bn_cifar")
    for part, folder in ((translation, "translation"), (cifar, "cifar")):
        for name in part["figures"]:
            (output_dir / name).write_bytes((output_dir / folder / name).read_bytes())
    return {"translation": translation, "cifar": cifar,
            "table": f"### Translation\n\n{translation['table']}\n\n### CIFAR-10\n\n{cifar['table']}",
            "figures": translation["figures"] + cifar["figures"]}


# ---------------------------------------------------------------------------------------------------- main

EXPERIMENTS = {"gradients": run_gradients, "stability": run_stability, "translation": run_translation,
               "cifar": run_cifar, "bn": run_bn, "depth": None}
DEFAULT_SEEDS = {"gradients": 1, "stability": 1, "translation": 3, "cifar": 3, "bn": 3, "depth": 3}
# Grids run by rskip.experiments.runner: resumable, side by side.
GRIDS = {"depth": depth_map}
PRESETS["depth"] = depth_map.PRESETS


CIFAR_MODELS = ("preact_resnet20", "preact_resnet56", "preact_resnet110", "preact_resnet164")
# The offline files each experiment reads from --data_dir (read_pairs takes PREFIX.<lang> or PREFIX.<lang>.gz).
NEEDED_DATA = {"stability": ["multi30k/train.en"], "translation": ["multi30k/train.en"],
               "cifar": ["cifar10/train.parquet"], "bn": ["multi30k/train.en", "cifar10/train.parquet"]}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (`sys.argv[1:]` when `argv` is None), checked: a bad value stops here, before any
    experiment starts, with usage and one line naming the flag."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="CPU scale, minutes on 2 cores (the default).")
    size.add_argument("--full", dest="preset", action="store_const", const="full", help="Paper scale, for GPUs.")
    size.add_argument("--mini", dest="preset", action="store_const", const="mini", help="Seconds: the tests' size.")
    parser.set_defaults(preset="quick")
    parser.add_argument("--seeds", type=COUNT, help="Seeds per configuration. Default: 1 for gradients and stability "
                                                    "(deterministic enough to read), 3 for the others.")
    parser.add_argument("--translation_preset", choices=sorted(TRANSLATION_DATA),
                        help="translation: the data (default multi30k; iwslt15 and wmt14 come from the Hub, for GPU "
                             "users; wmt14 compares transformer-base with rSkip+LN against transformer-big with "
                             "post-LN).")
    parser.add_argument("--models", nargs="+", choices=CIFAR_MODELS,
                        help="cifar, bn: the CIFAR models (default: the preset's).")
    parser.add_argument("--variants", nargs="+", choices=list(ALL_VARIANTS), metavar="VARIANT",
                        help="The variants to compare, by their labels (default: the preset's; e.g. plain "
                             f"'rskip_ln K=2'); the first is the reference. Known: {', '.join(ALL_VARIANTS)}.")
    parser.add_argument("--data_dir", type=Path, default=DATA, help="The offline data (multi30k/, cifar10/).")
    parser.add_argument("--output_dir", type=output_folder, help="Default: runs/reproduce/<experiment>-<preset>.")
    parser.add_argument("--converged", action="store_true",
                        help="cifar: a PreAct-ResNet-20 trained to the end of a 15-epoch schedule, plain against "
                             "rSkip+LN and post-LN, as a resumable grid.")
    parser.add_argument("--workers", type=COUNT, default=os.cpu_count(),
                        help="depth, cifar --converged: runs side by side, one thread each (default: one per core).")
    args = parser.parse_args(argv)
    if args.converged and args.experiment != "cifar":
        parser.error(f"argument --converged: not used by {args.experiment}; it goes with cifar")
    if args.converged and args.preset == "full":
        parser.error("argument --full: cifar --converged has the presets --quick and --mini; the paper's recipe is "
                     "cifar --full")
    if args.converged and (args.models or args.variants):
        parser.error(f"argument --{'models' if args.models else 'variants'}: cifar --converged compares a fixed set "
                     "(preact_resnet20: plain, rskip_ln K=2, post_ln)")
    if args.preset not in PRESETS[args.experiment]:
        parser.error(f"argument --{args.preset}: {args.experiment} has the presets "
                     f"{', '.join('--' + name for name in PRESETS[args.experiment])}"
                     + ("; on a GPU, scripts/gpu_evidence.sh runs it at width 256" if args.experiment == "depth" else ""))
    for flag, experiments in (("models", ("cifar", "bn")), ("variants", tuple(set(EXPERIMENTS) - {"bn", "depth"})),
                              ("translation_preset", ("translation",))):
        if getattr(args, flag) is not None and args.experiment not in experiments:
            parser.error(f"argument --{flag}: not used by {args.experiment}; it goes with "
                         f"{' and '.join(sorted(experiments))}")
    args.translation_preset = args.translation_preset or "multi30k"
    if args.translation_preset == "multi30k":
        missing = [name for name in NEEDED_DATA.get(args.experiment, [])
                   if not any((args.data_dir / (name + suffix)).is_file() for suffix in ("", ".gz"))]
        if missing:
            parser.error(f"argument --data_dir: '{args.data_dir}' has no "
                         f"{' or '.join(name + ('[.gz]' if name.endswith('.en') else '') for name in missing)}, which "
                         f"{args.experiment} reads; expected the folder of the offline data (../shared/data in a "
                         "clone)")
    args.seeds = args.seeds or (cifar_converged.DEFAULT_SEEDS if args.converged else DEFAULT_SEEDS[args.experiment])
    name = f"{args.experiment}{'-converged' if args.converged else ''}-{args.preset}"
    args.output_dir = Path(args.output_dir or Path("runs") / "reproduce" / name)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["rskip-reproduce", *(argv if argv is not None else sys.argv[1:])])
    if args.converged:
        return run_resumable_grid(cifar_converged, args, cifar_converged.PRESETS[args.preset], command)
    if args.experiment in GRIDS:
        return run_resumable_grid(GRIDS[args.experiment], args, PRESETS[args.experiment][args.preset], command)
    preset = PRESETS[args.experiment][args.preset]
    if args.variants:
        preset = dict(preset, variants=args.variants)
    if args.models and args.experiment == "cifar":
        preset = dict(preset, models=args.models)
    elif args.models and args.experiment == "bn":
        preset = dict(preset, cifar=dict(preset["cifar"], models=args.models))
    notes: list[str] = []
    started = time.time()
    if args.experiment == "translation" and args.translation_preset != "multi30k":
        preset = dict(preset, **WMT_OVERRIDES.get(args.translation_preset, {}))
        outcome = run_translation(preset, args.seeds, args.output_dir, args.data_dir, notes, args.translation_preset)
    elif args.experiment == "gradients":
        outcome = run_gradients(preset, args.seeds, args.output_dir, notes)
    else:
        outcome = EXPERIMENTS[args.experiment](preset, args.seeds, args.output_dir, args.data_dir, notes)
    wall = time.time() - started
    results = write_results(args, command, preset, outcome, notes, f"wall time {wall / 60:.1f} min",
                            wall_time_s=round(wall, 1))
    print((args.output_dir / "results.md").read_text())
    return results


def write_results(args, command: str, preset: dict, outcome: dict, notes: list[str], timing: str,
                  threads: int | None = None, **extra) -> dict:
    """results.json (everything, each run's command included) and results.md (notes, tables, figures)."""
    results = {"experiment": args.experiment, "preset": args.preset, "seeds": args.seeds, "command": command,
               "hardware": hardware(threads), **extra, "settings": preset, "notes": notes,
               **{key: value for key, value in outcome.items() if key not in ("table",)}}
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    figures = "\n".join(f"![{name}]({name})" for name in outcome["figures"])
    (args.output_dir / "results.md").write_text(
        f"# rskip-reproduce {args.experiment}{' --converged' if args.converged else ''} ({args.preset})\n\n"
        f"`{command}`\n\n"
        f"{args.seeds} seed(s); {hardware(threads)}; {timing}.\n\n"
        + "\n\n".join(notes) + f"\n\n{outcome['table']}\n\n{figures}\n\n"
        "A difference within the seeds' spread (the larger standard deviation) is reported as no difference. "
        "Each training run's command is in results.json.\n")
    return results


def run_resumable_grid(experiment, args, preset: dict, command: str) -> dict:
    """A grid of `rskip.experiments.runner`: the unfinished runs, side by side; results.{md,json} and the plots
    rebuilt after each finished run, from every finished run (also those of earlier sittings)."""
    specs = experiment.run_specs(preset, args.seeds, *experiment.prepare(preset, args.output_dir, args.data_dir))
    sittings_file = args.output_dir / "sittings.json"
    sittings = json.loads(sittings_file.read_text()) if sittings_file.is_file() else []
    sittings.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0, "workers": args.workers})
    started = time.time()
    results = {}

    def rebuild() -> None:
        nonlocal results
        sittings[-1]["wall_s"] = round(time.time() - started, 1)
        sittings_file.write_text(json.dumps(sittings, indent=1))
        outcome = experiment.summarise(preset, args.seeds, args.output_dir, specs)
        wall = sum(sitting["wall_s"] for sitting in sittings)
        timing = (f"{outcome['finished']} of {outcome['planned']} runs finished; wall time {wall / 3600:.2f} h over "
                  f"{len(sittings)} sitting(s) with {args.workers} run(s) side by side, one thread each; the runs' "
                  f"own training time {outcome['total_train_s'] / 3600:.2f} h")
        results = write_results(args, command, preset, outcome, [outcome["note"]], timing, threads=1,
                                wall_time_s=round(wall, 1), sittings=sittings)

    status = run_grid(specs, args.output_dir / "runs", args.workers, on_run_finished=rebuild)
    rebuild()
    print((args.output_dir / "results.md").read_text())
    failed = {name: value for name, value in status.items() if value.startswith("failed")}
    if failed:
        raise TrainingError(f"{len(failed)} run(s) failed and stay unfinished (run the same command again to retry "
                            "them): " + "; ".join(f"{name}: {value[len('failed: '):]}" for name, value in failed.items()))
    return results


# GPU presets of the translation experiment: the paper's data, transformer-base (wmt14: rSkip+LN base vs post-LN big).
WMT_OVERRIDES = {
    "iwslt15": dict(model="transformer-iwslt", layers=6, steps=50000, warmup=4000, lr=5e-4, max_tokens=4096,
                    beams=5, eval_samples=None),
    "wmt14": dict(model="transformer-base", layers=6, steps=100000, warmup=4000, lr=7e-4, max_tokens=8192, beams=4,
                  eval_samples=None, variants=["post_ln big", "post_ln", "rskip_ln K=2"]),
}


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
