"""`rskip-push-to-hub` from a clone of the repository (the same command, installed with the package); its code and flags are in
`rskip.commands.push_to_hub`: `rskip-push-to-hub --help`."""

from rskip.commands.push_to_hub import run

if __name__ == "__main__":
    run()
