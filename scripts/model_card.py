"""`rskip-model-card` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.model_card`: `rskip-model-card --help`."""

from rskip.commands.model_card import run

if __name__ == "__main__":
    run()
