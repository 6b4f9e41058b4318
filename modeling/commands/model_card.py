"""Write the model card (README.md) of a training run's output folder, from its results.json and config.json.

    rskip-model-card runs/m30k-rskip_ln --baseline runs/m30k-post_ln --repo_id user/m30k-rskip

The card is filled from the template in `model_cards/` for the run's task (`rskip.training.model_card`): Hub
metadata (`model-index` with the scores), the residual connection's equation, a usage snippet, the exact command
that produced the run, the scores with their sacreBLEU signatures, and, with `--baseline`, a table against another
run of the same task, with every setting in which the two commands differ besides the residual connection. The
training scripts write it at the end of every run.
"""

import argparse

from rskip.training.cli import CommandParser, finished_run, hub_repo_id, run_main
from rskip.training.model_card import write_model_card


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (`sys.argv[1:]` when `argv` is None), checked before the card is written."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=finished_run,
                        help="A finished run's --output_dir (holding results.json and config.json).")
    parser.add_argument("--repo_id", type=hub_repo_id, help="The Hub repository the card describes (default: the "
                                                            "run's --hub_model_id or the folder's name).")
    parser.add_argument("--baseline", type=finished_run, help="Another run's output folder (same task), compared in "
                        "a table; the card lists the settings in which its command differs besides the skip options.")
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        path = write_model_card(args.output_dir, args.repo_id, args.baseline)
    except (FileNotFoundError, ValueError) as error:
        args.parser.error(str(error))
    print(f"wrote {path}")


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
