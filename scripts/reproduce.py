"""`rskip-reproduce` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.reproduce`: `rskip-reproduce --help`."""

from rskip.commands.reproduce import run

if __name__ == "__main__":
    run()
