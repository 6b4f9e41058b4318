"""`rskip-train-translation` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.train_translation`: `rskip-train-translation --help`."""

from rskip.commands.train_translation import run

if __name__ == "__main__":
    run()
