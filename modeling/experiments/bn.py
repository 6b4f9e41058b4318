"""BatchNorm in place of LayerNorm in both families (`rskip-reproduce bn`): one grid of translation runs and CIFAR-10
runs, each part summarised as the translation and cifar experiments summarise theirs."""

from pathlib import Path

from . import cifar, translation
from .runner import RunSpec
from .variants import BN_VARIANTS

PARTS = {"translation": translation, "cifar": cifar}
PRESETS = {
    "mini": dict(translation=dict(translation.PRESETS["mini"], variants=["xskip_ln λ=2", "xskip_bn λ=2"]),
                 cifar=dict(cifar.PRESETS["mini"], variants=["xskip_ln λ=2", "xskip_bn λ=2"])),
    "quick": dict(translation=dict(translation.PRESETS["quick"], steps=40, eval_samples=100,
                                   variants=["rskip_ln K=2", "rskip_bn K=2"]),
                  cifar=dict(cifar.PRESETS["quick"], steps=10, batch=32, train_samples=2000, eval_samples=500,
                             variants=list(BN_VARIANTS))),
    "full": dict(translation=dict(translation.PRESETS["full"], variants=list(BN_VARIANTS)),
                 cifar=dict(cifar.PRESETS["full"], variants=list(BN_VARIANTS))),
}


def prepare(preset: dict, output_dir: Path, data_dir: Path) -> tuple[tuple, tuple]:
    """What `run_specs` takes: each part's prepared inputs (the translation runs' shared tokenizer included)."""
    return tuple(part.prepare(preset[name], output_dir, data_dir) for name, part in PARTS.items())


def run_specs(preset: dict, seeds: int, *prepared: tuple) -> list[RunSpec]:
    """The translation runs, then the CIFAR-10 runs; each run's name and settings say its part."""
    return [RunSpec(f"{name}-{spec.name}", spec.task, spec.argv, {"part": name, **spec.settings},
                    spec.checkpointing_steps)
            for (name, part), inputs in zip(PARTS.items(), prepared)
            for spec in part.run_specs(preset[name], seeds, *inputs)]


def summarise(preset: dict, seeds: int, output_dir: Path, specs: list[RunSpec]) -> dict:
    """Both parts' tables and curves, rebuilt from the finished runs."""
    parts = {name: part.summarise(preset[name], seeds, output_dir,
                                  [spec for spec in specs if spec.settings["part"] == name], family=f"bn_{name}")
             for name, part in PARTS.items()}
    return {"rows": [row for summary in parts.values() for row in summary["rows"]],
            **{key: sum(summary[key] for summary in parts.values()) for key in ("finished", "planned", "total_train_s")},
            "note": "\n\n".join(summary["note"] for summary in parts.values()),
            "table": f"### Translation\n\n{parts['translation']['table']}\n\n### CIFAR-10\n\n{parts['cifar']['table']}",
            "figures": [figure for summary in parts.values() for figure in summary["figures"]]}


__all__ = ["PRESETS", "prepare", "run_specs", "summarise"]
