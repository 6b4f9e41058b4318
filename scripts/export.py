"""`rskip-export` from a clone of the repository (the same command, installed with the package); its code and flags
are in `rskip.commands.export`: `rskip-export --help`."""

from rskip.commands.export import run

if __name__ == "__main__":
    run()
