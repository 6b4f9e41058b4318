"""Stopping a run cleanly on SIGTERM or SIGINT: finish the current update, save a checkpoint, exit.

A scheduler's SIGTERM (preemption, `scancel`, `kill`) or a first Ctrl-C only sets a flag; the loop checks it after
each optimizer update, all processes agreeing (`requested`), then saves a checkpoint and raises `RunStopped`, which
the scripts turn into the conventional exit status (128 + the signal's number). A second Ctrl-C stops at once.

Under `accelerate launch`, a signal sent to the launcher alone would leave the training processes running: on
Linux each asks the kernel for a SIGTERM when its parent process dies (`PR_SET_PDEATHSIG`), so they stop too, each
saving its part of the checkpoint.
"""

import ctypes
import signal
import sys
import threading

import torch
from accelerate import Accelerator

_PR_SET_PDEATHSIG = 1


class RunStopped(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_status` is 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_status = 128 + signum


class StopSignals:
    """A context in which SIGTERM and SIGINT ask the run to stop after the current update (see the module)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread only
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.received = signum
        print(f"\nReceived {signal.Signals(signum).name}: stopping after this update and saving a checkpoint "
              f"(press Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal any process received, the same answer on every process (a collective: call it on all)."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor(received, device=accelerator.device)
            received = int(accelerator.reduce(flag, "max").item())
        return received or None


__all__ = ["RunStopped", "StopSignals"]
