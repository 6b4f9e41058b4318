"""`rskip-train-image-classification` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.train_image_classification`: `rskip-train-image-classification --help`."""

from rskip.commands.train_image_classification import run

if __name__ == "__main__":
    run()
