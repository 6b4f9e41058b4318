"""`rskip-benchmark-deploy` from a clone of the repository (the same command, installed with the package); its code
and flags are in `rskip.commands.benchmark_deploy`: `rskip-benchmark-deploy --help`."""

from rskip.commands.benchmark_deploy import run

if __name__ == "__main__":
    run()
