"""Where rSkip+LN pays off: one command per experiment, each writing results.md, results.json and PNGs.

    rskip-reproduce gradients   [--quick | --full] [--seeds N]   # gradient norms at initialisation
    rskip-reproduce stability   ...   # depth x peak rate x warm-up: trains, stalls or diverges
    rskip-reproduce translation ...   # the paper's variant set on Multi30k EN-DE, mean ± std over seeds
    rskip-reproduce cifar       ...   # PreAct-ResNets on CIFAR-10
    rskip-reproduce bn          ...   # BatchNorm in place of LayerNorm, both families
    rskip-reproduce depth       ...   # depth x rate regime on the number task, trained to the end

Every training experiment is a resumable grid (`rskip.experiments.runner`): each run has its folder under
`<output_dir>/runs`, runs go side by side (`--workers`, one per core by default, one thread each), and the same command
run again skips finished runs and resumes interrupted ones, rebuilding results.md, results.json and the plots from
every finished run (the number of finished runs shown per cell).

`--quick` (the default) is sized for a few minutes on 2 CPU cores: small models, short runs, a subset of the data;
`--full` is the paper-scale recipe, for GPUs (`--translation_preset iwslt15|wmt14` selects the translation data of
the paper; those need the Hub). Training runs are the training commands' own command lines (each run's command is in
results.json); the gradient experiment measures `rskip.diagnostics.measure` at initialisation, without training. A
difference between two variants smaller than the larger of their standard deviations over seeds is reported as no
difference. The experiments themselves are in `rskip.experiments`; this module is their command line.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from rskip.experiments import bn, cifar, cifar_converged, depth_map, gradients, stability, translation
from rskip.experiments.runner import run_grid
from rskip.experiments.variants import ALL_VARIANTS
from rskip.training import TrainingError
from rskip.training.cli import COUNT, CommandParser, output_folder, run_main

# The offline data beside a clone of the repository (run from its root, as `make` does).
DATA = Path("..") / "shared" / "data"

# `gradients` measures in this process; the others are grids of `rskip.experiments.runner` (resumable, side by side),
# each module with PRESETS, prepare, run_specs and summarise.
EXPERIMENTS = {"gradients": gradients, "stability": stability, "translation": translation, "cifar": cifar, "bn": bn,
               "depth": depth_map}
PRESETS = {name: experiment.PRESETS for name, experiment in EXPERIMENTS.items()}
DEFAULT_SEEDS = {"gradients": 1, "stability": 1, "translation": 3, "cifar": 3, "bn": 3, "depth": 3}
# The offline files each experiment reads from --data_dir (read_pairs takes PREFIX.<lang> or PREFIX.<lang>.gz).
NEEDED_DATA = {"stability": ["multi30k/train.en"], "translation": ["multi30k/train.en"],
               "cifar": ["cifar10/train.parquet"], "bn": ["multi30k/train.en", "cifar10/train.parquet"]}


def hardware(threads: int | None = None) -> str:
    """The machine; `threads`: the torch threads of each run (default: this process's)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {threads or torch.get_num_threads()} torch thread(s)"


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
    parser.add_argument("--translation_preset", choices=sorted(translation.DATA),
                        help="translation: the data (default multi30k; iwslt15 and wmt14 come from the Hub, for GPU "
                             "users; wmt14 compares transformer-base with rSkip+LN against transformer-big with "
                             "post-LN).")
    parser.add_argument("--models", nargs="+", choices=cifar.MODELS,
                        help="cifar, bn: the CIFAR models (default: the preset's).")
    parser.add_argument("--variants", nargs="+", choices=list(ALL_VARIANTS), metavar="VARIANT",
                        help="The variants to compare, by their labels (default: the preset's; e.g. plain "
                             f"'rskip_ln K=2'); the first is the reference. Known: {', '.join(ALL_VARIANTS)}.")
    parser.add_argument("--data_dir", type=Path, default=DATA, help="The offline data (multi30k/, cifar10/).")
    parser.add_argument("--output_dir", type=output_folder,
                        help="Default: runs/reproduce/<experiment>-<preset> (translation from the Hub: "
                             "translation-<translation_preset>-<preset>).")
    parser.add_argument("--converged", action="store_true",
                        help="cifar: a PreAct-ResNet-20 trained to the end of a 15-epoch schedule, plain against "
                             "rSkip+LN and post-LN, as a resumable grid.")
    parser.add_argument("--workers", type=COUNT, default=os.cpu_count(),
                        help="Training runs side by side, one thread each (default: one per core).")
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
    # Hub translation data gets its own folder: its runs are named as Multi30k's but are other runs.
    data = f"-{args.translation_preset}" if args.translation_preset != "multi30k" else ""
    name = f"{args.experiment}{'-converged' if args.converged else ''}{data}-{args.preset}"
    args.output_dir = Path(args.output_dir or Path("runs") / "reproduce" / name)
    return args


def chosen_preset(args: argparse.Namespace) -> dict:
    """The experiment's preset with what the command line changes: the translation data, --variants, --models."""
    if args.converged:
        return cifar_converged.PRESETS[args.preset]
    preset = PRESETS[args.experiment][args.preset]
    if args.experiment == "translation":
        preset = translation.with_data(preset, args.translation_preset)
    if args.variants:
        preset = dict(preset, variants=args.variants)
    if args.models and args.experiment == "cifar":
        preset = dict(preset, models=args.models)
    elif args.models and args.experiment == "bn":
        preset = dict(preset, cifar=dict(preset["cifar"], models=args.models))
    return preset


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["rskip-reproduce", *(argv if argv is not None else sys.argv[1:])])
    preset = chosen_preset(args)
    if args.experiment != "gradients":
        return run_resumable_grid(cifar_converged if args.converged else EXPERIMENTS[args.experiment], args, preset,
                                  command)
    started = time.time()
    outcome = gradients.run(preset, args.seeds, args.output_dir)
    wall = time.time() - started
    results = write_results(args, command, preset, outcome, [outcome["note"]], f"wall time {wall / 60:.1f} min",
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

    def record_sitting() -> None:
        sittings[-1]["wall_s"] = round(time.time() - started, 1)
        sittings_file.write_text(json.dumps(sittings, indent=1))

    def rebuild() -> None:
        nonlocal results
        record_sitting()
        outcome = experiment.summarise(preset, args.seeds, args.output_dir, specs)
        wall = sum(sitting["wall_s"] for sitting in sittings)
        timing = (f"{outcome['finished']} of {outcome['planned']} runs finished; wall time {duration(wall)} over "
                  f"{len(sittings)} sitting(s) with {args.workers} run(s) side by side, one thread each; the runs' "
                  f"own training time {duration(outcome['total_train_s'])}")
        results = write_results(args, command, preset, outcome, [outcome["note"]], timing, threads=1,
                                wall_time_s=round(wall, 1), sittings=sittings)

    try:
        status = run_grid(specs, args.output_dir / "runs", args.workers, on_run_finished=rebuild)
    except BaseException:
        record_sitting()  # a sitting stopped by a signal counts in full, also with no run finished in it
        raise
    rebuild()
    print((args.output_dir / "results.md").read_text())
    failed = {name: value for name, value in status.items() if value.startswith("failed")}
    if failed:
        raise TrainingError(f"{len(failed)} run(s) failed and stay unfinished (run the same command again to retry "
                            "them): " + "; ".join(f"{name}: {value[len('failed: '):]}" for name, value in failed.items()))
    return results


def duration(seconds: float) -> str:
    """Minutes below an hour, hours above: a quick grid takes minutes, a converged one hours."""
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
