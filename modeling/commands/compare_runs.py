"""Compare finished training runs: a table of their scores and a PNG of their validation curves.

    rskip-compare-runs runs/m30k-post_ln runs/m30k-rskip_ln --output runs/m30k-comparison.png

Each argument is a run's --output_dir (translation or image classification, not mixed); rows are labelled by the
run's skip connection.
"""

import argparse
import json
from pathlib import Path

from rskip.training.cli import CommandParser, finished_run, run_main
from rskip.training.model_card import skip_options_of
from rskip.training.reporting import plot_curves

# The validation metrics each task records, and the columns the table shows.
TASK_METRICS = {"bleu": ["loss", "bleu", "chrf"], "top1": ["loss", "top1"]}


def label(results: dict) -> str:
    return skip_options_of(results).label()


def compare(run_dirs: list[Path], output: Path) -> list[dict]:
    runs = []
    for run_dir in run_dirs:
        if not (run_dir / "results.json").is_file():
            raise FileNotFoundError(f"{run_dir} has no results.json: not a finished training run's --output_dir")
        runs.append(json.loads((run_dir / "results.json").read_text()))
    kinds = {next(key for key in TASK_METRICS if key in results["validation"]) for results in runs}
    if len(kinds) > 1:
        raise ValueError(f"{', '.join(map(str, run_dirs))} mix translation and image-classification runs")
    metrics = TASK_METRICS[kinds.pop()]

    columns = [f"valid {name}" for name in metrics] + [f"test {name}" for name in metrics if name != "loss"]
    print(f"{'run':<28} {'best step':>9} " + " ".join(f"{column:>11}" for column in columns) + f" {'train min':>9}")
    for run_dir, results in zip(run_dirs, runs):
        values = [results["validation"][name] for name in metrics]
        values += [results.get("test", {}).get(name, float("nan")) for name in metrics if name != "loss"]
        print(f"{label(results) + ' (' + run_dir.name + ')':<28} {results['best_step']:>9} "
              + " ".join(f"{value:>11.2f}" for value in values) + f" {results['train_runtime_s'] / 60:>9.1f}")
    signature = runs[0]["validation"].get("bleu_signature")
    if signature:
        print(f"BLEU {signature}; chrF {runs[0]['validation']['chrf_signature']}")
    plot_curves({f"{label(results)} ({run_dir.name})": results["history"] for run_dir, results in zip(run_dirs, runs)},
                metrics, output)
    print(f"wrote {output}")
    return runs


def figure_path(text: str) -> Path:
    """--output: an image file matplotlib can write (.png, .pdf, .svg...) in an existing folder."""
    import matplotlib.pyplot as plt

    path = Path(text)
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image file name; expected one ending in "
                                         f"{', '.join('.' + name for name in sorted(formats))}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected an image file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: its folder {str(path.parent)!r} does not exist")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (`sys.argv[1:]` when `argv` is None), checked before any run is read."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=finished_run, help="Finished runs' output folders.")
    parser.add_argument("--output", type=figure_path, default=Path("comparison.png"),
                        help="Where to write the curves (.png, .pdf, .svg...).")
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return compare(args.run_dirs, args.output)
    except (FileNotFoundError, ValueError) as error:
        args.parser.error(str(error))


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
