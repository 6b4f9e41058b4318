"""The one exception type of the training library, and how several processes report one error once.

Work done by the main process first (reading data, training a tokenizer) may fail there alone; the other
processes, waiting for it, must stop too instead of hanging or dying in a collective with a traceback of their own.
`main_process_first` runs the work on the main process, then on the others, and raises the same `TrainingError` on
every process if any failed; the scripts print it once (`rskip.training.cli.run_main` prints on the main process).
"""

from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

Result = TypeVar("Result")


class TrainingError(Exception):
    """A problem the user must fix (bad input, a wrong checkpoint, a diverged run), reported as one message."""


class TrainingDiverged(TrainingError):
    """The training loss became non-finite at optimizer step `step`: for a user an error like any other, for an
    experiment an outcome to record (`rskip.experiments.runner`)."""

    def __init__(self, message: str, step: int, loss: float):
        super().__init__(message)
        self.step, self.loss = step, loss


def main_process_first(accelerator: Accelerator, work: Callable[[], Result]) -> Result:
    """`work()` on the main process, then on the others (which can then reuse what it cached); a `TrainingError`
    on any process is raised on every process."""
    if accelerator.num_processes == 1:
        return work()
    result, failure = None, None
    if accelerator.is_main_process:
        result, failure = _attempt(work)
    (failure,) = broadcast_object_list([failure])
    if failure is None and not accelerator.is_main_process:
        result, failure = _attempt(work)
    failures = [message for message in gather_object([failure]) if message is not None]
    if failures:
        raise TrainingError(failures[0])
    return result


def on_main_process(accelerator: Accelerator, work: Callable[[], Result]) -> Result | None:
    """`work()` on the main process only (None elsewhere); a `TrainingError` there is raised on every process."""
    result, failure = _attempt(work) if accelerator.is_main_process else (None, None)
    if accelerator.num_processes > 1:
        (failure,) = broadcast_object_list([failure])
    if failure is not None:
        raise TrainingError(failure)
    return result


def _attempt(work: Callable[[], Result]) -> tuple[Result | None, str | None]:
    try:
        return work(), None
    except TrainingError as error:
        return None, str(error)


__all__ = ["TrainingError", "main_process_first", "on_main_process"]
