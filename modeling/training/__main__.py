"""`python -m rskip.training`: the training library has no command of its own; this names the commands built on it."""

import sys

from ..commands import __doc__ as COMMANDS

print(f"rskip.training is a library. {COMMANDS}", file=sys.stderr)
sys.exit(2)
