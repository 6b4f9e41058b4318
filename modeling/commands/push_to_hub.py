"""Push a finished training run's output folder to the Hub.

    rskip-push-to-hub runs/m30k-rskip_ln user/m30k-rskip [--private] [--revision R] [--create_pr]

Checks that the folder is a complete run (and says what is missing), rewrites its model card for REPO_ID from its
results, checks the token and the repository, then uploads the model folder without the training state
(`rskip.training.hub.push_finished_run`). Image models also go up in timm's format. The token is --token, else
HF_TOKEN or `hf auth login`'s.
"""

import argparse

from rskip.training.cli import CommandParser, finished_run, hub_repo_id, run_main
from rskip.training.hub import push_finished_run


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (`sys.argv[1:]` when `argv` is None), checked before anything is uploaded."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=finished_run, help="A finished run's --output_dir.")
    parser.add_argument("repo_id", type=hub_repo_id, help="The Hub repository, user/name; created if needed.")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--revision", help="A branch to push to (created from main if needed).")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit_message")
    parser.add_argument("--token")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    url = push_finished_run(args.run_dir, args.repo_id, token=args.token, private=args.private or None,
                            revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message)
    print(f"pushed {args.run_dir} to {url}")
    return url


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
