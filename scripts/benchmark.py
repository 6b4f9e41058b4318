"""`rskip-benchmark` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.benchmark`: `rskip-benchmark --help`."""

from rskip.commands.benchmark import run

if __name__ == "__main__":
    run()
