"""What every rskip command's line is checked with, light enough for any command to import (the benchmark runs
where the training library's dependencies are not installed): a parser whose usage error is reported once under a
launcher, and argparse types for numbers in a range and output folders."""

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from .failure_report import report_failure


class CommandParser(argparse.ArgumentParser):
    """The parser of every rskip command: argparse's, whose usage error (usage, then `<prog>: error: argument
    --flag: ...`, exit status 2) is printed once under a launcher with several processes and named as the root
    cause in the launcher's summary, like a `TrainingError` in `run_main`."""

    def error(self, message: str):
        line = f"{self.prog}: error: {message}"
        report_failure(line, printed=self.format_usage() + line)
        sys.exit(2)


def bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float]:
    """An argparse `type` for a finite int or float in a range, whose error says what is allowed."""
    name = "an integer" if kind is int else "a number"
    limits = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
              f"{'<' if high_open else '<='} {high}" if high is not None else ""]
    allowed = f"{name} {' and '.join(limit for limit in limits if limit)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or (
                high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed
    return parse


COUNT = bounded(int, 1)  # sizes, steps, limits: at least one
NON_NEGATIVE_INT = bounded(int, 0)
POSITIVE = bounded(float, 0, low_open=True)
NON_NEGATIVE = bounded(float, 0)
FRACTION = bounded(float, 0, 1, high_open=True)  # momentum, betas, label smoothing
WARMUP_FACTOR = bounded(float, 0, 1, low_open=True)
# SentencePiece needs room for the special tokens and the characters of the data; smaller sizes are refused early.
VOCAB_SIZE = bounded(int, 16)
SEED = bounded(int, 0, 2**32 - 1)


def output_folder(text: str) -> str:
    """--output_dir: a folder, existing or not, but not a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder (existing or not)")
    return text
