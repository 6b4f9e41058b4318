"""`rskip.training.failure_report`: under torch elastic, one process prints a failure and every process hands it to
the launcher in the form the launcher's summary reads as its root cause (checked with torch's own reader)."""

import json

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from rskip.failure_report import report_failure


def elastic_process(monkeypatch, attempt_folder, local_rank: int):
    """The environment torch elastic gives the process of `local_rank`: its error file in its own folder of the
    launch attempt, `<log_dir>/<run_id>/attempt_<n>/<local_rank>/error.json`."""
    (attempt_folder / str(local_rank)).mkdir(parents=True, exist_ok=True)
    error_file = attempt_folder / str(local_rank) / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    return error_file


def test_the_first_process_to_fail_prints_and_every_process_names_the_error_to_the_launcher(tmp_path, monkeypatch,
                                                                                            capsys):
    attempt = tmp_path / "run_id" / "attempt_0"
    second = elastic_process(monkeypatch, attempt, 1)
    report_failure("error: bad data")  # rank 1 fails first: it prints, though it is not the main process
    assert capsys.readouterr().err == "error: bad data\n"
    first = elastic_process(monkeypatch, attempt, 0)
    report_failure("error: bad data")
    assert capsys.readouterr().err == ""

    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1, error_file=str(path))
                for rank, path in ((1, second), (0, first))}
    assert all(failure.message == "error: bad data" for failure in failures.values())
    summary = str(ChildFailedError("train", failures))
    assert "traceback : error: bad data" in summary.split("Root Cause (first observed failure):")[1]


def test_a_killed_process_without_an_error_file_is_not_the_root_cause(tmp_path, monkeypatch):
    failed = elastic_process(monkeypatch, tmp_path / "run_id" / "attempt_0", 0)
    report_failure("error: bad data")
    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-15, error_file=str(tmp_path / "missing.json"))
    error = ChildFailedError("train", {0: ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(failed)),
                                       1: killed})
    assert error.get_first_failure()[0] == 0


@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False)])
def test_without_torch_elastic_the_main_process_prints(monkeypatch, capsys, rank, prints):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", rank)
    report_failure("error: bad data", printed="usage: x\nerror: bad data")
    assert capsys.readouterr().err == ("usage: x\nerror: bad data\n" if prints else "")


def test_an_error_file_holds_the_one_line_not_the_printed_usage(tmp_path, monkeypatch, capsys):
    error_file = elastic_process(monkeypatch, tmp_path / "run_id" / "attempt_0", 0)
    report_failure("prog: error: argument --seeds: expected an integer >= 1, got '0'",
                   printed="usage: prog [-h]\nprog: error: argument --seeds: expected an integer >= 1, got '0'")
    assert json.loads(error_file.read_text())["message"] == ("prog: error: argument --seeds: expected an integer >= 1, "
                                                             "got '0'")
    assert capsys.readouterr().err.startswith("usage: prog [-h]\n")
