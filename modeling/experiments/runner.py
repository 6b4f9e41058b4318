"""A grid of training runs that can be completed over several sittings.

Each run is one folder of the grid's `runs/`, named by its settings (`RunSpec.name`). A run is finished when its
folder holds results.json (written last by the training library) or diverged.json (the training loss became
non-finite: an outcome, recorded by `rskip.experiments.train_run`). `run_grid` starts the unfinished runs side by
side, `workers` at a time, each in its own process with one thread; every run saves a checkpoint regularly and is
started with `--resume_from_checkpoint latest`, so running the grid again skips what has finished and continues an
interrupted run from its newest checkpoint. A run that fails (a bug, not a divergence) is reported and left
unfinished; the others go on.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..training.errors import TrainingError
from ..training.signals import RunStopped

FINISHED_MARKERS = ("results.json", "diverged.json")
SETTINGS_FILE = "settings.json"
LOG_FILE = "log.txt"
# One thread per process: `workers` processes share the cores instead of fighting over them. A run's log is a file
# read for hours: its progress bars redraw every 30 seconds, not ten times a second (160 KB a run at 800 updates).
WORKER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                      "TQDM_MININTERVAL": "30"}


@dataclass(frozen=True)
class RunSpec:
    """One training run of a grid.

    `name`: its folder, unique in the grid and derived from `settings`; `task`: `translation` or
    `image_classification` (the training command it runs); `argv`: that command's flags, without --output_dir and
    the checkpoint flags, which the runner adds; `settings`: what distinguishes the run, for tables (stored in the
    folder's settings.json and checked when the grid runs again)."""

    name: str
    task: str
    argv: tuple[str, ...]
    settings: dict = field(default_factory=dict)
    checkpointing_steps: str = "100"

    def record(self) -> dict:
        return {"name": self.name, "task": self.task, "argv": list(self.argv), "settings": self.settings}


def is_finished(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in FINISHED_MARKERS)


def read_outcome(folder: Path) -> dict | None:
    """The finished run's results.json, or {"diverged": ...} from diverged.json; None while unfinished."""
    for marker in FINISHED_MARKERS:
        if (folder / marker).is_file():
            return json.loads((folder / marker).read_text())
    return None


def finished_row(spec: RunSpec, folder: Path) -> tuple[dict, dict] | None:
    """(row, result) of a finished run, None while unfinished: the row holds the run's settings, name and command,
    and for a diverged run where it diverged (`diverged`, `diverged_at_step`); result is `read_outcome`'s."""
    result = read_outcome(folder)
    if result is None:
        return None
    row = {**spec.settings, "run": spec.name, "command": result.get("command")}
    if "diverged" in result:
        row.update(diverged=result["diverged"], diverged_at_step=result["step"])
    return row, result


def check_folder(spec: RunSpec, folder: Path) -> None:
    """Refuse a folder that holds a run of other settings (a changed grid definition must not mix results)."""
    recorded = folder / SETTINGS_FILE
    if recorded.is_file() and json.loads(recorded.read_text()) != spec.record():
        raise TrainingError(f"{folder} holds a run of other settings than {spec.name} now has (see its "
                            f"{SETTINGS_FILE}); move it away or choose another --output_dir")


def worker_command(spec: RunSpec, folder: Path) -> list[str]:
    return [sys.executable, "-m", "rskip.experiments.train_run", spec.task, *spec.argv, "--output_dir", str(folder),
            "--checkpointing_steps", spec.checkpointing_steps, "--checkpoints_total_limit", "1",
            "--resume_from_checkpoint", "latest"]


def last_error_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def report_progress(line: str) -> None:
    print(line, flush=True)  # at once, also into a log file: a grid runs for hours


def run_grid(specs: list[RunSpec], runs_dir: Path, workers: int, report: Callable[[str], None] = report_progress,
             on_run_finished: Callable[[], None] | None = None) -> dict:
    """Run the unfinished `specs` in `runs_dir`, `workers` at a time, in the order given; return {name: status}
    with status 'finished', 'diverged' or 'failed: <its error line>'. `on_run_finished()` is called after each run
    that finishes (to rebuild tables from the finished runs). SIGTERM or Ctrl-C stops the running runs, each after
    saving a checkpoint, and re-raises."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique in a grid: {sorted({n for n in names if names.count(n) > 1})}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        check_folder(spec, runs_dir / spec.name)
    pending = [spec for spec in specs if not is_finished(runs_dir / spec.name)]
    status = {spec.name: "finished" for spec in specs if spec not in pending}
    report(f"{len(specs)} runs: {len(status)} finished before, {len(pending)} to run, {workers} at a time "
           f"(logs: {runs_dir}/<run>/{LOG_FILE})")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    started = time.time()
    previous_handler = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.pop(0)
                running[spec.name] = (start(spec, runs_dir / spec.name), time.time())
            time.sleep(0.5)
            for name, (process, since) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                folder = runs_dir / name
                if process.returncode == 0 and is_finished(folder):
                    status[name] = "diverged" if (folder / "diverged.json").is_file() else "finished"
                else:
                    status[name] = f"failed: {last_error_line(folder / LOG_FILE)}"
                done = sum(1 for value in status.values() if not value.startswith("failed"))
                report(f"[{done}/{len(specs)} done, {time.time() - started:.0f} s] {name}: {status[name]} in "
                       f"{time.time() - since:.0f} s; {len(running)} running, {len(pending)} waiting")
                if on_run_finished is not None and not status[name].startswith("failed"):
                    on_run_finished()
    except BaseException:
        if running:
            report(f"stopping: {', '.join(running)} save a checkpoint first; the same command continues the grid")
        stop(running)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return status


def _raise_stopped(signum, frame):
    raise RunStopped(signum, "the grid stopped on SIGTERM after its running runs saved checkpoints; run the same "
                             "command again to continue")


def start(spec: RunSpec, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETTINGS_FILE).write_text(json.dumps(spec.record(), indent=1))
    with open(folder / LOG_FILE, "a") as log:
        log.write(f"\n$ {' '.join(worker_command(spec, folder))}\n")
        log.flush()
        return subprocess.Popen(worker_command(spec, folder), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **WORKER_ENVIRONMENT}, start_new_session=True)


def stop(running: dict[str, tuple[subprocess.Popen, float]]) -> None:
    """Ask each running run to stop (SIGTERM: it finishes its update and saves a checkpoint), then wait."""
    for process, _ in running.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process, _ in running.values():
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()


__all__ = ["RunSpec", "finished_row", "is_finished", "read_outcome", "run_grid"]
