"""One message for one failure, however many processes meet it.

Under `accelerate launch` (torch elastic) every training process that meets a bad input raises the same error
(`rskip.training.errors.main_process_first`) or a bad flag. The launcher stops the other processes as soon as one exits, then
prints a summary of the failed processes whose root cause (the first failure) it reads from the JSON file each
process is given in `TORCHELASTIC_ERROR_FILE`; without one, the summary says only "To enable traceback see ...".

`report_failure(message)` prints the message on the first process of the machine to fail (not on every process, and
not on the main process only, which the launcher may stop before it gets there) and writes it into that file, so
that the launcher's summary names the same one line as the root cause. torch's `record` decorator writes the file
too, but with the Python traceback, which the summary would then print as a second traceback.
"""

import json
import os
import sys
import time
from pathlib import Path

# The file a process creates to claim the report, beside the processes' own folders of one launch attempt.
REPORTED_MARKER = "rskip-failure-reported"


def report_failure(message: str, *, printed: str | None = None) -> None:
    """Print `printed` (default: `message`) to stderr if this process is the one to report the failure, and hand
    `message` (one line) to the launcher as this process's root cause."""
    if _claims_the_report():
        print(printed if printed is not None else message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # The form torch elastic's `ProcessFailure` reads as a plain message (no traceback): {"message": str,
        # "timestamp": seconds}. The earliest timestamp is the root cause.
        Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def _claims_the_report() -> bool:
    """True on one process per machine: the first to fail under torch elastic, else the main process (RANK 0, or
    no launcher at all)."""
    attempt_folder = _launch_attempt_folder()
    if attempt_folder is None:
        return os.environ.get("RANK", "0") == "0"
    try:
        os.close(os.open(attempt_folder / REPORTED_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # a folder we cannot write to: fall back to the main process
        return os.environ.get("RANK", "0") == "0"
    return True


def _launch_attempt_folder() -> Path | None:
    """The folder that torch elastic shares between the processes of one launch attempt on this machine:
    `<log_dir>/<run_id>/attempt_<n>/<local_rank>/error.json` is each process's error file."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return None
    rank_folder = Path(error_file).parent
    if rank_folder.name != os.environ.get("LOCAL_RANK") or not rank_folder.parent.name.startswith("attempt_"):
        return None  # another layout than torch elastic's: do not guess
    return rank_folder.parent


__all__ = ["report_failure"]
