"""`python -m rskip.training`: the training library has no command of its own; this names the commands built on it."""

import sys

from ..commands import COMMANDS

lines = [f"  {command:<34} python -m {module}" for command, module in COMMANDS.items()]
print("rskip.training is a library, not a command. Its commands:", *lines, sep="\n", file=sys.stderr)
sys.exit(2)
