"""rskip.experiments: a grid of runs completed over several sittings, and the two grids of `rskip-reproduce`
(`depth`, `cifar --converged`) at the tests' size."""

import hashlib
import json
import math
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from datasets import load_dataset

from rskip.commands import reproduce
from rskip.experiments import cifar_converged, depth_map
from rskip.experiments.depth_rules import (bigram_loss, divergence_threshold, outcome_of, task_outcome,
                                          unigram_loss)
from rskip.experiments.number_task import prepare_number_task
from rskip.experiments.runner import RunSpec, read_outcome, run_grid
from rskip.experiments.summaries import mean_history
from rskip.training import TrainingError


@pytest.fixture(scope="module")
def number_task(tmp_path_factory):
    return prepare_number_task(tmp_path_factory.mktemp("task"), train_size=200, eval_size=8)


def translation_spec(name, number_task, steps=4, learning_rate="1e-3", extra=(), checkpointing_steps="2"):
    data, tokenizer = number_task
    argv = ("--train_file", str(data / "train"), "--validation_file", str(data / "valid"), "--test_file",
            str(data / "test"), "--source_lang", "en", "--target_lang", "de", "--tokenizer_name", str(tokenizer),
            "--model_preset", "transformer-tiny", "--config_overrides", "encoder_layers=1,decoder_layers=1",
            "--learning_rate", learning_rate, "--num_warmup_steps", "0", "--max_tokens", "256",
            "--max_train_steps", str(steps), "--eval_steps", str(steps), "--num_beams", "1", "--seed", "0", *extra)
    return RunSpec(name, "translation", argv, {"name": name}, checkpointing_steps)


def test_a_grid_stopped_by_sigterm_resumes_where_it_stopped_and_skips_what_finished(tmp_path, number_task):
    """The real path: the grid's process gets SIGTERM in the middle of a run; the run saves a checkpoint and the
    grid exits 143. The same grid run again skips the finished run and continues the interrupted one, which ends
    exactly as the same run does uninterrupted."""
    interrupted = translation_spec("interrupted", number_task, steps=300, checkpointing_steps="5")
    script = tmp_path / "grid.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom rskip.experiments.runner import RunSpec, run_grid\n"
        "from rskip.training.cli import run_main\n"
        f"spec = RunSpec(**{interrupted.__dict__!r})\n"
        f"run_main(lambda: run_grid([spec], Path({str(tmp_path / 'runs')!r}), workers=1))\n")
    grid = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "runs" / "interrupted" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    grid.send_signal(signal.SIGTERM)
    output, _ = grid.communicate(timeout=300)
    assert grid.returncode == 128 + signal.SIGTERM, output
    assert "stopping: interrupted save a checkpoint first; the same command continues the grid" in output
    assert read_outcome(tmp_path / "runs" / "interrupted") is None, "the run finished before it could be stopped"
    saved_state = json.loads(next(checkpoints.iterdir()).joinpath("run_state.json").read_text())
    saved = saved_state["step"]
    assert 0 < saved < 300 and saved_state["train_seconds"] > 0

    reference = translation_spec("reference", number_task, steps=300, checkpointing_steps="5")
    reports = []
    status = run_grid([interrupted, reference], tmp_path / "runs", workers=2, report=reports.append)
    assert status == {"interrupted": "finished", "reference": "finished"}
    log = (tmp_path / "runs" / "interrupted" / "log.txt").read_text()
    assert f"Resumed from {checkpoints / f'step_{saved}'}: step {saved}" in log
    resumed, uninterrupted = (read_outcome(tmp_path / "runs" / name) for name in ("interrupted", "reference"))
    assert resumed["history"][-1] == uninterrupted["history"][-1]
    assert resumed["test"] == uninterrupted["test"]
    # the time of the first sitting counts too (it is in the checkpoint)
    assert resumed["train_runtime_s"] > round(saved_state["train_seconds"], 1)

    reports.clear()
    assert run_grid([interrupted, reference], tmp_path / "runs", workers=2, report=reports.append) == status
    assert reports == ["2 runs: 2 finished before, 0 to run, 2 at a time "
                       f"(logs: {tmp_path / 'runs'}/<run>/log.txt)"]


def test_a_diverged_run_is_an_outcome_and_a_failed_run_is_retried(tmp_path, number_task):
    diverging = translation_spec("diverging", number_task, learning_rate="1e30", extra=("--max_grad_norm", "0"))
    failing = translation_spec("failing", number_task, extra=("--test_file", str(tmp_path / "missing")))
    status = run_grid([failing, diverging], tmp_path / "runs", workers=2, report=lambda line: None)
    assert status["diverging"] == "diverged"
    outcome = read_outcome(tmp_path / "runs" / "diverging")
    assert outcome["step"] >= 1 and not math.isfinite(float(outcome["loss"]))
    assert outcome["command"].startswith("rskip-train-translation --train_file")
    assert status["failing"].startswith("failed: error: ") and "missing" in status["failing"]
    assert read_outcome(tmp_path / "runs" / "failing") is None
    reports = []
    run_grid([failing, diverging], tmp_path / "runs", workers=2, report=reports.append)
    assert reports[0].startswith("2 runs: 1 finished before, 1 to run")


def test_a_folder_of_other_settings_is_refused(tmp_path, number_task):
    """Before any run starts: a changed grid definition must not mix its results with the old ones."""
    spec = translation_spec("run", number_task)
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "settings.json").write_text(json.dumps(spec.record()))
    changed = translation_spec("run", number_task, steps=6)
    with pytest.raises(TrainingError, match=r"runs/run holds a run of other settings than run now has"):
        run_grid([changed], tmp_path / "runs", workers=1)


def test_the_unigram_loss_and_the_outcome_rule():
    assert unigram_loss([[0, 0, 1]], [[0, 1]], vocab_size=2) == pytest.approx(-(math.log(3 / 5) + math.log(2 / 5)) / 2)
    stalled_above, diverged_above = 3.0, divergence_threshold(100)
    assert diverged_above == pytest.approx(math.log(100) + 1)
    assert outcome_of(2.9, stalled_above, diverged_above) == "trains"
    assert outcome_of(3.0, stalled_above, diverged_above) == "stalls"
    assert outcome_of(diverged_above + 0.01, stalled_above, diverged_above) == "diverges"
    assert outcome_of(float("nan"), stalled_above, diverged_above) == "diverges"
    assert outcome_of(None, stalled_above, diverged_above) == "diverges"


def test_the_depth_maps_outcome_rule_asks_for_exact_translations():
    """Trained to the end, a loss below the unigram line is not enough: a decoder that never reads the source gets
    there (the 12+12 aggressive runs did, with 0 % exact)."""
    diverged_above = divergence_threshold(100)
    assert task_outcome(0.1, 50.0, diverged_above) == "trains"
    assert task_outcome(1.8, 49.5, diverged_above) == "stalls"
    assert task_outcome(1.8, None, diverged_above) == "stalls"
    assert task_outcome(diverged_above + 0.01, 99.0, diverged_above) == "diverges"
    assert task_outcome(float("inf"), 0.0, diverged_above) == "diverges"


def test_the_bigram_loss_knows_the_previous_token_and_backs_off_to_the_unigram():
    train = [[1, 2, 0], [1, 2, 0], [3, 0]]
    # After 1, the next token is always 2: half of the unseen-follower mass (discount 0.75 of 2 counts) is given back.
    unigram = {token: (count + 1) / (8 + 4) for token, count in {0: 3, 1: 2, 2: 2, 3: 1}.items()}
    p_2_after_1 = (2 - 0.75) / 2 + 0.75 * 1 / 2 * unigram[2]
    assert bigram_loss(train, [[1, 2]], vocab_size=4) == pytest.approx(
        -(math.log((2 - 0.75) / 3 + 0.75 * 2 / 3 * unigram[1]) + math.log(p_2_after_1)) / 2)
    assert bigram_loss(train, [[1, 2, 0]], 4) < unigram_loss(train, [[1, 2, 0]], 4)
    # After a token never seen as a context (3), the unigram model alone: p(1) = (1 + 1) / (2 + 4).
    assert bigram_loss([[1, 0]], [[3, 1]], 4) == pytest.approx(-(math.log(0.75 * 1 / 6) + math.log(2 / 6)) / 2)


def test_mean_history_averages_the_steps_every_seed_reached():
    histories = [[{"step": 1, "loss": 4.0, "bleu": 1.0}, {"step": 2, "loss": 2.0, "bleu": float("nan")}],
                 [{"step": 1, "loss": 6.0, "bleu": 3.0}, {"step": 2, "loss": 4.0, "bleu": 5.0}, {"step": 3, "loss": 1.0}]]
    assert mean_history(histories) == [{"step": 1, "loss": 5.0, "bleu": 2.0}, {"step": 2, "loss": 3.0, "bleu": 5.0}]
    assert mean_history([]) == []


def test_the_grids_in_progress_keep_their_run_definitions():
    """A grid is completed over several sittings, so a change of code must not change the runs of depth and cifar
    --converged (the runner would refuse their folders): their specs, byte for byte, as when they were started."""
    depth = [spec for name in ("mini", "quick")
             for spec in depth_map.run_specs(depth_map.PRESETS[name], 3, Path("task/data"), Path("task/tokenizer"))]
    converged = [spec for name in ("mini", "quick") for spec in cifar_converged.run_specs(
        cifar_converged.PRESETS[name], 2, Path("data/cifar10/train.parquet"))]
    digest = {name: hashlib.sha256(json.dumps([[spec.record(), spec.checkpointing_steps] for spec in specs],
                                              ensure_ascii=False).encode()).hexdigest()
              for name, specs in (("depth", depth), ("converged", converged))}
    assert digest == {"depth": "311b598dc20345038bdcd504b431b9964cfbf12d1ccb50c3afc40ceeb7b19a70",
                      "converged": "aacd672ed97523e7c43e610c1947ec0e8101dc80bf19e88dbe8e0f3325b4f035"}
    assert depth[-1].record() == {
        "name": "d24-aggressive-rskip_ln_K2-seed2", "task": "translation",
        "argv": ["--train_file", "task/data/train", "--validation_file", "task/data/valid", "--test_file",
                 "task/data/test", "--source_lang", "en", "--target_lang", "de", "--tokenizer_name", "task/tokenizer",
                 "--model_preset", "transformer-tiny", "--config_overrides", "encoder_layers=24,decoder_layers=24",
                 "--learning_rate", "0.003", "--num_warmup_steps", "0", "--max_tokens", "2048", "--max_train_steps",
                 "800", "--eval_steps", "50", "--num_beams", "4", "--val_max_target_length", "24", "--bleu_tokenize",
                 "char", "--seed", "2", "--skip_variant", "rskip_ln", "--skip_recursions", "2"],
        "settings": {"depth": 24, "regime": "aggressive", "lr": 0.003, "warmup": 0, "variant": "rskip_ln K=2",
                     "seed": 2}}


def test_the_depth_grid_at_the_tests_size_and_its_second_sitting(tmp_path, capsys):
    output = tmp_path / "depth"
    results = reproduce.main(["depth", "--mini", "--seeds", "1", "--output_dir", str(output)])
    assert results["finished"] == results["planned"] == 2 * 2 * 3  # depths x regimes x variants
    assert {row["outcome"] for row in results["rows"]} <= {"trains", "stalls", "diverges"}
    assert all(0 <= row["test_exact"] <= 100 and row["converged_at_step"] in (2, 4) for row in results["rows"])
    markdown = (output / "results.md").read_text()
    assert "12 of 12 runs finished" in markdown and "(n=1)" in markdown
    assert "| 2+2 | aggressive |" in markdown and "rskip_ln K=2 vs pre_ln" in markdown
    verdicts = "(no difference|better|worse)"
    assert re.search(rf"\| 1\+1 \| moderate \| .* \| {verdicts} / {verdicts} \| {verdicts} / {verdicts} \|", markdown)
    for figure in results["figures"]:
        assert (output / figure).stat().st_size > 0
    for log in (output / "runs").glob("*/log.txt"):  # the bar drawn when it opens and when it closes, nothing between
        assert log.read_text().count("training: ") <= 2, log.read_text()
    capsys.readouterr()
    again = reproduce.main(["depth", "--mini", "--seeds", "1", "--output_dir", str(output)])
    assert "12 runs: 12 finished before, 0 to run" in capsys.readouterr().out
    assert [row["test_exact"] for row in again["rows"]] == [row["test_exact"] for row in results["rows"]]
    assert len(again["sittings"]) == 2


def test_the_validation_curves_of_a_grid_in_progress_mark_the_regime_with_no_finished_run(tmp_path):
    """After the first finished run only one regime has curves: the other panel says so instead of an empty legend."""
    history = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.5}]
    rows = [{"regime": "moderate", "variant": "post_ln", "history": history}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no labelled line
        path = depth_map.plot_validation_curves(rows, tmp_path / "curves.png")
    assert path.stat().st_size > 0


def test_a_sitting_stopped_before_any_run_finished_still_counts_in_the_wall_time(tmp_path, monkeypatch):
    """sittings.json is what the wall time of a grid adds up: a sitting stopped by SIGTERM is recorded with its time
    even when none of its runs finished (the tables are rebuilt only when one does)."""
    from rskip.training.signals import RunStopped

    def stopped_after_a_while(*args, **kwargs):
        time.sleep(0.3)
        raise RunStopped(signal.SIGTERM, "stopped")

    monkeypatch.setattr(reproduce, "run_grid", stopped_after_a_while)
    output = tmp_path / "depth"
    for _ in range(2):
        with pytest.raises(RunStopped):
            reproduce.main(["depth", "--mini", "--seeds", "1", "--output_dir", str(output)])
    sittings = json.loads((output / "sittings.json").read_text())
    assert len(sittings) == 2 and all(sitting["wall_s"] >= 0.3 for sitting in sittings)


def test_the_converged_cifar_table_compares_every_variant_on_top1_and_loss(tmp_path):
    """rSkip+LN against plain in the table and against post-LN below it, each on top-1 and on loss, by the rule:
    a gap within the larger standard deviation over seeds is no difference."""
    preset = cifar_converged.PRESETS["quick"]
    specs = cifar_converged.run_specs(preset, 2, Path("data/cifar10/train.parquet"))
    finals = {"plain": [(80.0, 0.50), (80.2, 0.50)], "rskip_ln K=2": [(82.0, 0.40), (82.2, 0.41)],
              "post_ln": [(81.9, 0.45), (82.3, 0.46)]}
    for spec in specs:
        top1, loss = finals[spec.settings["variant"]][spec.settings["seed"]]
        (tmp_path / "runs" / spec.name).mkdir(parents=True)
        (tmp_path / "runs" / spec.name / "results.json").write_text(json.dumps(
            {"history": [{"step": 352, "top1": top1, "loss": loss}], "validation": {"top1": top1},
             "train_runtime_s": 3600, "command": "train"}))
    table = cifar_converged.summarise(preset, 2, tmp_path, specs)["table"]
    assert "| vs plain: top-1 / loss |" in table
    assert re.search(r"\| rskip_ln K=2 \| 2 of 2 \| 82\.10 ± 0\.14 \|.*\| better / better \|", table)
    assert re.search(r"\| post_ln \| 2 of 2 \|.*\| better / better \|", table)
    assert table.endswith("rskip_ln K=2 vs post_ln (top-1 / loss): no difference / better.")


def test_the_converged_cifar_grid_at_the_tests_size(tmp_path):
    """On 48 CIFAR-10 images laid out as ../shared/data: 32 to train on, the last 16 to validate on."""
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    images = load_dataset("parquet", data_files=str(SHARED_DATA / "cifar10" / "train.parquet"), split="train[:48]")
    images.to_parquet(str(tmp_path / "data" / "cifar10" / "train.parquet"))
    output = tmp_path / "cifar"
    results = reproduce.main(["cifar", "--converged", "--mini", "--seeds", "1", "--data_dir", str(tmp_path / "data"),
                              "--output_dir", str(output)])
    assert [row["variant"] for row in results["rows"]] == ["plain", "rskip_ln K=2"]
    for row in results["rows"]:
        assert row["top1"] == row["history"][-1]["top1"]
        assert row["binomial_error"] == pytest.approx(100 * math.sqrt(row["top1"] / 100 * (1 - row["top1"] / 100) / 16))
    assert "| rskip_ln K=2 | 1 of 1 |" in (output / "results.md").read_text()
