"""Gradients at initialisation (`rskip-reproduce gradients`): for each variant and depth, a transformer and a CIFAR
PreAct-ResNet are built and measured with `rskip.diagnostics.measure` on a random batch, without training: the ratio of
the first to the last sublayer's gradient norm, the mean gradient norm and the output change under one Adam step."""

import statistics
from pathlib import Path

import torch

from .. import CifarPreActResNet, ResNetSkipOptions, RSkipMarianConfig, RSkipMarianMTModel, SkipOptions
from ..diagnostics import measure, plot_by_depth, plot_layers, random_batch
from ..training.translation import MODEL_PRESETS
from .summaries import mean_std
from .variants import ALL_VARIANTS, GRADIENT_VARIANTS

# "mini" is the tests' size (seconds), "quick" a CPU's (minutes), "full" the paper's depths.
PRESETS = {
    "mini": dict(depths=[3, 6], variants=["xskip λ=0.5", "rskip_ln K=2"], batch=2, length=4, image_size=8),
    "quick": dict(depths=[6, 12, 24, 48], variants=list(GRADIENT_VARIANTS), batch=8, length=16),
    "full": dict(depths=[6, 12, 24, 48, 96], variants=list(GRADIENT_VARIANTS), batch=32, length=32),
}


def marian_at_depth(depth: int, flags: list[str], vocab_size: int = 1000) -> RSkipMarianMTModel:
    """transformer-tiny with `depth` encoder and `depth` decoder layers and the variant's --skip_* `flags`."""
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
    """A flag's value as SkipOptions takes it: an int, a float, or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run(preset: dict, seeds: int, output_dir: Path) -> dict:
    """Measure every variant at every depth and seed; the tables, plots and the note on what was measured."""
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
    note = ("Gradients of the mean cross-entropy on a random batch (transformer-tiny, d = 64, a depth of D means "
                 "D encoder and D decoder layers; CIFAR PreAct-ResNets with D blocks, 8 random 32×32 images), at "
                 "initialisation. A ratio far from 1 means the first sublayers get a vanishing (< 1) or exploding "
                 "(> 1) share of the gradient; NaN means the gradients overflowed.")
    return {"records": records, "note": note, "table": "\n".join(lines), "figures": [f.name for f in figures]}


__all__ = ["PRESETS", "marian_at_depth", "resnet_at_depth", "run"]
