"""What users can rely on when things go wrong: no leaked secrets, every flag checked before work starts, verifiable
checkpoints, signals that save, no silent reuse of another run's folder, and data errors before training."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rskip.commands import train_image_classification as train
from conftest import REPO
from image_helpers import cifar_parquet, cifar_rows, one_torch_thread, tiny_args, write_image_folder  # noqa: F401
from rskip.training import TrainingConfig, TrainingError
from rskip.training.checkpoints import MANIFEST, checkpoint_problem, list_checkpoints
from rskip.training.cli import command_line, parse_image_classification_args, parse_translation_args
from rskip.training.image_classification import load_raw_datasets
from rskip.training.signals import StopSignals
from rskip.training.translation import build_model
from rskip.training.translation import load_raw_datasets as load_translation_pairs

SCRIPT = REPO / "scripts" / "train_image_classification.py"
TRANSLATION_BASE = ["--train_file", "x", "--validation_file", "y", "--source_lang", "en", "--target_lang", "de",
                    "--model_preset", "transformer-tiny", "--output_dir", "out"]
IMAGE_BASE = ["--train_file", "x", "--output_dir", "out"]


# -------------------------------------------------------------------------------------------------------- secrets

def test_a_hub_token_is_written_nowhere(tmp_path, cifar_parquet):
    output_dir = tmp_path / "run"
    results = train.main(tiny_args(cifar_parquet, output_dir, "--max_train_steps", "2", "--checkpointing_steps", "2",
                                   "--with_tracking", "--hub_token", "hf_FAKE123"))
    assert "--hub_token '<redacted>'" in results["command"] or "--hub_token <redacted>" in results["command"]
    files = [path for path in output_dir.rglob("*") if path.is_file()]
    assert any(path.parts[-3] == "logs" or "logs" in path.parts for path in files)  # the tracker wrote its files
    assert [path for path in files if b"hf_FAKE123" in path.read_bytes()] == []


def test_the_recorded_command_redacts_both_spellings_of_the_token():
    command = command_line("train.py", ["--hub_token", "hf_A", "--hub_token=hf_B", "--seed", "1"])
    assert "hf_A" not in command and "hf_B" not in command and command.endswith("--seed 1")


# ---------------------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("parse, base, flags, message", [
    (parse_translation_args, TRANSLATION_BASE, ["--num_beams", "0"], "argument --num_beams: expected an integer >= 1, got '0'"),
    (parse_translation_args, TRANSLATION_BASE, ["--eval_steps", "0"], "argument --eval_steps: expected a number of steps or 'epoch', got '0'"),
    (parse_translation_args, TRANSLATION_BASE, ["--checkpointing_steps", "0"], "argument --checkpointing_steps: expected a number of steps or 'epoch', got '0'"),
    (parse_translation_args, TRANSLATION_BASE, ["--gradient_accumulation_steps", "0"], "argument --gradient_accumulation_steps: expected an integer >= 1, got '0'"),
    (parse_translation_args, TRANSLATION_BASE, ["--num_warmup_steps", "-5"], "argument --num_warmup_steps: expected an integer >= 0, got '-5'"),
    (parse_translation_args, TRANSLATION_BASE, ["--vocab_size", "10"], "argument --vocab_size: expected an integer >= 16, got '10'"),
    (parse_translation_args, TRANSLATION_BASE, ["--per_device_train_batch_size", "0"], "argument --per_device_train_batch_size: expected an integer >= 1, got '0'"),
    (parse_translation_args, TRANSLATION_BASE, ["--max_train_steps", "0"], "argument --max_train_steps: expected an integer >= 1, got '0'"),
    (parse_translation_args, TRANSLATION_BASE, ["--learning_rate", "nan"], "argument --learning_rate: expected a number >= 0, got 'nan'"),
    (parse_translation_args, TRANSLATION_BASE, ["--label_smoothing", "1"], "argument --label_smoothing: expected a number >= 0 and < 1, got '1'"),
    (parse_image_classification_args, IMAGE_BASE, ["--per_device_train_batch_size", "0"], "argument --per_device_train_batch_size: expected an integer >= 1, got '0'"),
    (parse_image_classification_args, IMAGE_BASE, ["--max_train_steps", "0"], "argument --max_train_steps: expected an integer >= 1, got '0'"),
    (parse_image_classification_args, IMAGE_BASE, ["--momentum", "1.5"], "argument --momentum: expected a number >= 0 and < 1, got '1.5'"),
    (parse_image_classification_args, IMAGE_BASE, ["--warmup_factor", "0"], "argument --warmup_factor: expected a number > 0 and <= 1, got '0'"),
    (parse_image_classification_args, IMAGE_BASE, ["--seed", "-1"], "argument --seed: expected an integer >= 0 and <= 4294967295, got '-1'"),
])
def test_bad_numbers_are_refused_naming_flag_value_and_allowed_range(capsys, parse, base, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse([*base, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("parse, base", [(parse_translation_args, TRANSLATION_BASE),
                                         (parse_image_classification_args, IMAGE_BASE)])
def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys, parse, base):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        parse([*base[:-1], str(tmp_path / "file")])
    assert f"argument --output_dir: '{tmp_path / 'file'}' is a file; expected a folder" in capsys.readouterr().err


NUMERIC_FLAGS = {
    "--num_beams": st.integers(-3, 6), "--gradient_accumulation_steps": st.integers(-3, 6),
    "--num_warmup_steps": st.integers(-5, 50), "--max_train_steps": st.integers(-3, 50),
    "--num_train_epochs": st.integers(-3, 5), "--checkpoints_total_limit": st.integers(-3, 5),
    "--max_grad_norm": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "--learning_rate": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "--eval_steps": st.one_of(st.integers(-3, 50), st.just("epoch")),
    "--checkpointing_steps": st.one_of(st.integers(-3, 50), st.just("epoch")),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.fixed_dictionaries({}, optional=NUMERIC_FLAGS))
def test_numeric_flags_are_accepted_whole_or_refused_naming_the_flag(capsys, values):
    """Whatever numbers are given, the command line either refuses one flag by name, or every value it accepts is
    one the loop's typed config accepts too: no value reaches the loop unchecked."""
    flags = [word for flag, value in values.items() for word in (flag, str(value))]
    try:
        args = parse_translation_args([*TRANSLATION_BASE, *flags])
    except SystemExit as exit_info:
        assert exit_info.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert any(f"argument {flag}:" in error for flag in values), error
        return
    TrainingConfig.from_args(args)


# ----------------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, cifar_parquet):  # noqa: F811
    """A 4-update run with checkpoints after updates 2 and 4; a pristine copy of step_4 is kept beside it."""
    output_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    args = tiny_args(cifar_parquet, output_dir, "--checkpointing_steps", "2")
    train.main(args)
    shutil.copytree(output_dir / "checkpoints" / "step_4", output_dir.parent / "pristine_step_4")
    return output_dir, args


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                  "run_state.json"])
def test_a_truncated_checkpoint_file_is_found_and_named(checkpointed_run, tmp_path, name):
    output_dir, _ = checkpointed_run
    checkpoint = shutil.copytree(output_dir.parent / "pristine_step_4", tmp_path / "step_4")
    assert checkpoint_problem(checkpoint) is None
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(checkpoint) == (f"{checkpoint / name} has {len(data) // 2} bytes, {len(data)} when it "
                                              f"was written (truncated?)")


def test_every_checkpoint_lists_its_files_sizes_and_checksums(checkpointed_run):
    output_dir, _ = checkpointed_run
    manifest = json.loads((output_dir / "checkpoints" / "step_2" / MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "run_state.json"} <= set(
        manifest)
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest.values())


def test_latest_skips_a_damaged_checkpoint_and_resumes_bit_exactly_from_the_one_before(checkpointed_run, capsys):
    output_dir, args = checkpointed_run
    damaged = output_dir / "checkpoints" / "step_4" / "random_states_0.pkl"
    damaged.write_bytes(damaged.read_bytes()[:10])
    capsys.readouterr()
    train.main([*args, "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert f"Skipping checkpoint {damaged.parent}: {damaged} has 10 bytes" in out
    assert f"Resumed from {output_dir / 'checkpoints' / 'step_2'}" in out
    # The resumed run wrote step_4 again: the same weights as the uninterrupted run's.
    assert (damaged.parent / "model.safetensors").read_bytes() == (
        output_dir.parent / "pristine_step_4" / "model.safetensors").read_bytes()


def test_resuming_from_a_named_damaged_checkpoint_is_an_error_naming_the_file(checkpointed_run, tmp_path):
    output_dir, args = checkpointed_run
    checkpoint = shutil.copytree(output_dir.parent / "pristine_step_4", tmp_path / "step_4")
    (checkpoint / "optimizer.bin").write_bytes(b"")
    message = (f"--resume_from_checkpoint {checkpoint} cannot be resumed from: {checkpoint / 'optimizer.bin'} has "
               f"0 bytes")
    with pytest.raises(TrainingError, match=re.escape(message)):
        train.main([*args, "--resume_from_checkpoint", str(checkpoint)])


# ------------------------------------------------------------------------------------------------ reused folders

def test_a_finished_run_is_not_replaced_without_asking(checkpointed_run, tmp_path, cifar_parquet):  # noqa: F811
    output_dir, _ = checkpointed_run
    reused = shutil.copytree(output_dir, tmp_path / "run")
    args = tiny_args(cifar_parquet, reused, "--skip_variant", "post_ln", "--max_train_steps", "2")
    with pytest.raises(TrainingError, match=r"holds a finished run \(results.json\); pass --overwrite_output_dir"):
        train.main(args)
    train.main([*args, "--overwrite_output_dir"])
    assert list_checkpoints(reused) == []  # the old run's checkpoints went with it
    assert json.loads((reused / "results.json").read_text())["skip"]["skip_variant"] == "post_ln"


# ------------------------------------------------------------------------------------------------------- signals

def start_run(tmp_path: Path, cifar_parquet: Path, launcher: list[str] | None = None) -> tuple[subprocess.Popen, Path]:
    """A long tiny run in a fresh process, returned once its first checkpoint exists (it is then mid-training)."""
    output_dir = tmp_path / "run"
    command = [*(launcher or [sys.executable]), str(SCRIPT),
               *tiny_args(cifar_parquet, output_dir, "--max_train_steps", "400", "--eval_steps", "1000",
                          "--checkpointing_steps", "3")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not list_checkpoints(output_dir):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    return process, output_dir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_update_saves_a_checkpoint_and_exits_with_its_status(tmp_path, cifar_parquet, signum):  # noqa: F811
    process, output_dir = start_run(tmp_path, cifar_parquet)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    last = list_checkpoints(output_dir)[-1]
    step = json.loads((last / "run_state.json").read_text())["step"]
    assert 3 <= step < 400 and checkpoint_problem(last) is None
    assert (f"Stopped by {signal.Signals(signum).name} after update {step}; saved {last}. To continue, run the same "
            f"command with --resume_from_checkpoint latest") in stdout
    assert "Traceback" not in stderr


@pytest.fixture(params=["default_int_handler", "ignored"])
def inherited_sigint(request):
    """SIGINT's disposition before a run, set here rather than inherited: Python's `default_int_handler` in a
    foreground process, "ignored" when the suite was started in the background (`make test &`, nohup, some CI)."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, {"default_int_handler": signal.default_int_handler,
                                  "ignored": signal.SIG_IGN}[request.param])
    yield signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_stops_at_once_and_the_previous_handler_comes_back(inherited_sigint):
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 5
        while signals.received is None and time.time() < deadline:
            time.sleep(0.01)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is inherited_sigint


def test_sigterm_to_accelerate_launch_stops_every_process(tmp_path, cifar_parquet):  # noqa: F811
    import psutil

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "0",  # a free port: tests may run side by side
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    process, output_dir = start_run(tmp_path, cifar_parquet, launcher)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)
               if str(SCRIPT) in " ".join(child.cmdline())]
    assert len(workers) == 2
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert alive == [], [worker.cmdline() for worker in alive]
    last = list_checkpoints(output_dir)[-1]
    assert checkpoint_problem(last) is None and (last / "random_states_1.pkl").is_file()


# ---------------------------------------------------------------------------------------------------------- data

def test_an_empty_text_file_is_named(tmp_path):
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        (tmp_path / name).write_text("" if name == "train.en" else "a line\n")
    with pytest.raises(TrainingError, match=re.escape(f"{tmp_path / 'train.en'} is empty")):
        load_translation_pairs(parse_translation_args([
            "--train_file", str(tmp_path / "train"), "--validation_file", str(tmp_path / "valid"),
            "--source_lang", "en", "--target_lang", "de", "--model_preset", "transformer-tiny",
            "--output_dir", str(tmp_path / "run")]))


def test_a_corrupt_validation_image_is_found_before_training(tmp_path):
    images = [image for image, _ in cifar_rows(0, 8)]
    write_image_folder(tmp_path / "train", {"cat": images[:3], "dog": images[3:6]})
    write_image_folder(tmp_path / "val", {"cat": images[6:7], "dog": images[7:]})
    data = (tmp_path / "val" / "dog" / "0.png").read_bytes()
    (tmp_path / "val" / "dog" / "0.png").write_bytes(data[: len(data) // 2])  # a valid header, truncated pixels
    with pytest.raises(TrainingError, match=r"validation data: .*val/dog/0\.png \(row 1\) is not a readable image"):
        load_raw_datasets(parse_image_classification_args(["--train_dir", str(tmp_path / "train"), "--validation_dir",
                                                           str(tmp_path / "val"), "--output_dir", "out"]))


def test_a_corrupt_training_row_is_named_by_its_row(tmp_path, cifar_parquet):  # noqa: F811
    table = pq.read_table(cifar_parquet).slice(0, 40)
    images = table.column("img").to_pylist()
    images[7] = {"bytes": b"not an image", "path": None}
    pq.write_table(table.set_column(0, table.schema.field("img"), pa.array(images, table.schema.field("img").type)),
                   tmp_path / "train.parquet")
    with pytest.raises(TrainingError, match=r"^training data: row 7 is not a readable image \(PIL cannot identify "
                                            r"its format\)$"):
        load_raw_datasets(parse_image_classification_args(["--train_file", str(tmp_path / "train.parquet"),
                                                           "--validation_size", "8", "--output_dir", "out"]))


def launch_two_processes(flags: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "0",  # a free port: tests may run side by side
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def root_cause(launcher_stderr: str) -> str:
    """The message of the root cause in the launcher's summary of failed processes (torch elastic's format)."""
    summary = launcher_stderr.split("Root Cause (first observed failure):", 1)[1]
    line = next(line for line in summary.splitlines() if line.strip().startswith("traceback :"))
    return line.split(":", 1)[1].strip()


def tracebacks_outside_the_launcher(stderr: str) -> list[str]:
    """Frames of any traceback that are not the launcher's own (accelerate's and torch's code)."""
    import accelerate

    launcher_code = (str(Path(accelerate.__file__).parent), str(Path(torch.__file__).parent), "<frozen runpy>")
    frames = [line.strip() for line in stderr.splitlines() if line.lstrip().startswith('File "')]
    return [frame for frame in frames if not frame[len('File "'):].startswith(launcher_code)]


def test_with_two_processes_a_data_error_is_one_message_and_the_launchers_root_cause(tmp_path, cifar_parquet):  # noqa: F811
    completed = launch_two_processes(tiny_args(cifar_parquet, tmp_path / "run", "--label_column", "category"))
    assert completed.returncode != 0
    message = f"error: {cifar_parquet} has no column 'category' (--label_column); its columns are: img, label"
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [message], completed.stderr[-3000:]
    assert root_cause(completed.stderr) == message, completed.stderr[-3000:]
    # No process shows a traceback of its own; `accelerate launch` prints its own (see the README).
    assert tracebacks_outside_the_launcher(completed.stderr) == [] and "TrainingError" not in completed.stderr
    assert completed.stderr.count("Traceback (most recent call last)") <= 1


def test_with_two_processes_a_bad_flag_is_one_usage_error_and_the_launchers_root_cause(tmp_path, cifar_parquet):  # noqa: F811
    completed = launch_two_processes(tiny_args(cifar_parquet, tmp_path / "run", "--max_train_steps", "0"))
    assert completed.returncode != 0
    message = "argument --max_train_steps: expected an integer >= 1, got '0'"
    errors = [line for line in completed.stderr.splitlines()
              if line.endswith(f"error: {message}") and not line.startswith(" ")]  # not the launcher's summary
    assert len(errors) == 1 and completed.stderr.count("usage: ") == 1, completed.stderr[-3000:]
    assert root_cause(completed.stderr) == errors[0], completed.stderr[-3000:]
    assert tracebacks_outside_the_launcher(completed.stderr) == []


@pytest.mark.parametrize("overrides, message", [
    ("d_model=30", "d_model=30 is not divisible by the number of attention heads"),
    ("dropout=x", "could not convert string to float"),
    ("no_such_field=1", "key no_such_field isn't in the original config dict"),
])
def test_config_overrides_are_checked_like_the_config_before_any_work(capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_translation_args([*TRANSLATION_BASE, "--config_overrides", overrides])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"{Path(sys.argv[0]).name}: error: argument --config_overrides: {overrides!r}: ") and \
        message in error, error


def test_config_overrides_of_a_checkpoint_are_checked_when_it_is_read(marian_tokenizer):
    args = parse_translation_args([*TRANSLATION_BASE[:-4], "--model_name_or_path", "unused", "--output_dir", "out",
                                   "--config_overrides", "d_model=30", "--tokenizer_name",
                                   marian_tokenizer.name_or_path])
    args.model_name_or_path, args.model_preset = None, "transformer-tiny"  # build from the preset, as a checkpoint
    with pytest.raises(TrainingError, match=r"model configuration: d_model=30"):
        build_model(args, marian_tokenizer)
