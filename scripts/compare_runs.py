"""`rskip-compare-runs` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.compare_runs`: `rskip-compare-runs --help`."""

from rskip.commands.compare_runs import run

if __name__ == "__main__":
    run()
