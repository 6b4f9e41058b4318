"""Every command checks its command line before any work: a bad number, path or choice exits with status 2, usage
and one line naming the flag the user typed, the bad value and what is allowed -- never a traceback.

The tables below list, per command, every numeric flag with a valid example and an out-of-range value; a new
command is one more `Command(...)` line, a new flag one more row (the completeness test fails until it is added).
"""

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import Seq2SeqTrainingArguments, TrainingArguments

import demo
from conftest import REPO
from rskip.commands import (COMMANDS as INSTALLED_COMMANDS, benchmark, benchmark_deploy, compare_runs, export,
                            model_card, push_to_hub, reproduce)
from rskip.experiments import gpu_evidence, gpu_evidence_pack
from rskip.training.cli import parse_image_classification_args, parse_trainer_args, parse_translation_args


@dataclass(frozen=True)
class Number:
    """A numeric flag: a value it takes, a value out of its range, which of 0 and -1 it takes, and flags it needs."""
    flag: str
    valid: str
    out_of_range: str
    allows: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    name: str
    parse: object  # parses and checks a command line, doing no work
    entry: list[str]  # how a user starts it
    base: list[str]  # the required arguments
    numbers: list[Number] = field(default_factory=list)
    # How many of the parsers it runs read its own command line (demo then checks the training command lines it
    # will start with train_translation's parser, whose flags are not demo's).
    own_parsers: int | None = None


def numbers(*rows) -> list[Number]:
    return [row if isinstance(row, Number) else Number(*row) for row in rows]


TRANSLATION_NUMBERS = numbers(
    ("--max_source_length", "64", "inf"), ("--max_target_length", "64", "inf"), ("--max_train_samples", "10", "inf"),
    ("--max_eval_samples", "10", "inf"), ("--max_predict_samples", "10", "inf"),
    ("--preprocessing_num_workers", "2", "inf"), ("--vocab_size", "1000", "15"),
    Number("--learning_rate", "1e-3", "inf", ("0",)), Number("--adam_beta1", "0.9", "1", ("0",)),
    Number("--adam_beta2", "0.98", "1", ("0",)), ("--adam_epsilon", "1e-9", "inf"),
    Number("--weight_decay", "0.01", "nan", ("0",)), Number("--num_warmup_steps", "100", "1.5", ("0",)),
    Number("--label_smoothing", "0.1", "1", ("0",)), Number("--max_grad_norm", "1", "inf", ("0",)),
    ("--max_tokens", "1024", "inf"), ("--per_device_train_batch_size", "8", "inf"),
    ("--gradient_accumulation_steps", "2", "inf"), ("--num_train_epochs", "3", "inf"),
    ("--max_train_steps", "100", "inf"), Number("--seed", "7", "4294967296", ("0",)),
    ("--eval_steps", "epoch", "1.5"), ("--per_device_eval_batch_size", "8", "inf"), ("--num_beams", "4", "inf"),
    ("--val_max_target_length", "64", "inf"), ("--checkpointing_steps", "epoch", "1.5"),
    ("--checkpoints_total_limit", "2", "inf"), Number("--diagnostics_steps", "0,100", "1,x", ("0",)),
    ("--skip_recursions", "3", "inf"), Number("--skip_scale", "2", "inf", needs=("--skip_variant", "xskip_ln")),
)
IMAGE_NUMBERS = numbers(
    ("--validation_size", "0.1", "1.5"), ("--num_labels", "10", "inf"), ("--max_train_samples", "10", "inf"),
    ("--max_eval_samples", "10", "inf"), Number("--dataloader_num_workers", "2", "inf", ("0",)),
    Number("--learning_rate", "0.1", "inf", ("0",)), Number("--momentum", "0.9", "1", ("0",)),
    Number("--weight_decay", "1e-4", "nan", ("0",)), Number("--label_smoothing", "0.1", "1", ("0",)),
    Number("--max_grad_norm", "1", "inf", ("0",)), ("--per_device_train_batch_size", "8", "inf"),
    ("--gradient_accumulation_steps", "2", "inf"), ("--num_train_epochs", "3", "inf"),
    ("--max_train_steps", "100", "inf"), Number("--seed", "7", "4294967296", ("0",)),
    ("--lr_decay_milestones", "0.5", "1"), ("--lr_decay_rate", "0.1", "inf"),
    Number("--num_warmup_steps", "100", "1.5", ("0",)), ("--warmup_factor", "0.1", "1.5"),
    Number("--crop_padding", "4", "inf", ("0",)), ("--eval_steps", "epoch", "1.5"),
    ("--per_device_eval_batch_size", "8", "inf"), ("--checkpoints_total_limit", "2", "inf"),
    ("--checkpointing_steps", "epoch", "1.5"), Number("--diagnostics_steps", "0,100", "1,x", ("0",)),
    ("--skip_recursions", "3", "inf"), Number("--skip_scale", "2", "inf", needs=("--skip_variant", "xskip_ln")),
)
# transformers' TrainingArguments fields: the Trainer commands take these, and the script's flags of other names.
TRAINER_NUMBERS = numbers(
    ("--per_device_train_batch_size", "8", "inf"), ("--per_device_eval_batch_size", "8", "inf"),
    ("--gradient_accumulation_steps", "2", "inf"), ("--eval_accumulation_steps", "2", "inf"),
    ("--num_train_epochs", "3", "inf"), Number("--max_steps", "100", "1.5", ("-1",)),
    Number("--learning_rate", "1e-3", "inf", ("0",)), Number("--warmup_steps", "100", "inf", ("0",)),
    Number("--weight_decay", "0.01", "nan", ("0",)), Number("--adam_beta1", "0.9", "1", ("0",)),
    Number("--adam_beta2", "0.98", "1", ("0",)), ("--adam_epsilon", "1e-8", "inf"),
    Number("--max_grad_norm", "1", "inf", ("0",)), Number("--label_smoothing_factor", "0.1", "1", ("0",)),
    ("--neftune_noise_alpha", "5", "inf"), ("--torch_empty_cache_steps", "10", "inf"),
    ("--logging_steps", "50", "inf"), ("--eval_steps", "50", "inf"), Number("--eval_delay", "1", "inf", ("0",)),
    ("--save_steps", "50", "inf"), ("--save_total_limit", "2", "inf"), Number("--seed", "7", "4294967296", ("0",)),
    Number("--data_seed", "7", "4294967296", ("0",)), Number("--dataloader_num_workers", "2", "inf", ("0",)),
    Number("--dataloader_prefetch_factor", "2", "inf", needs=("--dataloader_num_workers", "2")),
    ("--ddp_bucket_cap_mb", "25", "inf"), ("--ddp_timeout", "60", "inf"),
    Number("--local_rank", "0", "-2", ("0", "-1")),
)
SEQ2SEQ_NUMBERS = numbers(("--generation_max_length", "64", "inf"), ("--generation_num_beams", "4", "inf"))


def trainer_table(arguments_numbers: list[Number], script_numbers: list[Number]) -> list[Number]:
    """A Trainer command's numbers: its TrainingArguments class's fields, then the script's flags of other names."""
    fields = {row.flag for row in arguments_numbers}
    return arguments_numbers + [row for row in script_numbers if row.flag not in fields]


TRANSLATION_BASE = ["--train_file", "x", "--validation_file", "y", "--source_lang", "en", "--target_lang", "de",
                    "--model_preset", "transformer-tiny", "--output_dir", "out"]
IMAGE_BASE = ["--train_file", "x", "--output_dir", "out"]
MODULE = [sys.executable, "-m"]

COMMANDS = [
    Command("benchmark", benchmark.parse_args, [*MODULE, "rskip.commands.benchmark"], [], numbers(
        ("--threads", "1", "inf"), ("--min_run_time", "0.5", "inf"), ("--rounds", "3", "inf"),
        ("--batch_size", "8", "inf"), ("--d_model", "512", "inf"), ("--heads", "8", "inf"), ("--layers", "2", "inf"),
        ("--vocab_size", "100", "2"), ("--seq_len", "16", "inf"), ("--generate_batch_size", "4", "17"),
        ("--image_size", "32", "7"), ("--op_rows", "64", "inf"), ("--op_features", "512", "inf"),
        ("--op_recursions", "2", "5"))),
    Command("reproduce", reproduce.parse_args, [*MODULE, "rskip.commands.reproduce"], ["gradients"],
            numbers(("--seeds", "2", "inf"), ("--workers", "2", "inf"))),
    Command("demo", demo.parse_args, [sys.executable, str(REPO / "scripts" / "demo.py")], [], numbers(
        ("--largest_number", "9999", "100"), ("--train_size", "100", "inf"), ("--eval_size", "10", "inf"),
        ("--max_train_steps", "100", "inf"), ("--eval_steps", "10", "inf"),
        Number("--seed", "7", "4294967296", ("0",))), own_parsers=1),
    Command("compare_runs", compare_runs.parse_args, [*MODULE, "rskip.commands.compare_runs"], ["RUN"]),
    Command("model_card", model_card.parse_args, [*MODULE, "rskip.commands.model_card"], ["RUN"]),
    Command("push_to_hub", push_to_hub.parse_args, [*MODULE, "rskip.commands.push_to_hub"], ["RUN", "user/name"]),
    Command("export", export.parse_args, [*MODULE, "rskip.commands.export"], ["resnet18", "--output_dir", "out"],
            numbers(("--opset", "18", "24"), ("--image_size", "64", "15"), ("--skip_recursions", "3", "inf"),
                    Number("--skip_scale", "2", "inf", needs=("--skip_variant", "xskip_ln")))),
    Command("benchmark_deploy", benchmark_deploy.parse_args, [*MODULE, "rskip.commands.benchmark_deploy"], [],
            numbers(("--vocab_size", "100", "15"), ("--num_beams", "2", "inf"), ("--batch_sizes", "1,4", "1,x"),
                    ("--source_length", "8", "inf"), ("--new_tokens", "8", "inf"), ("--image_size", "64", "31"),
                    ("--repeats", "2", "inf"), ("--threads", "1", "257"))),
    # scripts/gpu_evidence.sh and scripts/gpu_evidence_pack.sh pass their flags on to these modules.
    Command("gpu_evidence", gpu_evidence.parse_args, [*MODULE, "rskip.experiments.gpu_evidence"], ["out"], numbers(
        ("--budget_minutes", "8", "inf"), ("--started", "1700000000", "inf"), ("--seeds", "3", "1"),
        ("--parallel", "16", "inf"), ("--cifar_share", "0.5", "1"), ("--probe_updates", "20", "inf"),
        ("--validation_images", "5000", "inf"), ("--batch_size", "128", "inf"), ("--depths", "6", "inf"),
        ("--d_model", "256", "inf"), ("--ffn_dim", "1024", "inf"), ("--heads", "4", "inf"))),
    Command("gpu_evidence_pack", gpu_evidence_pack.parse_args, [*MODULE, "rskip.experiments.gpu_evidence_pack"], [],
            numbers(("--max_images", "100", "inf"), ("--number_train_size", "100", "inf"),
                    ("--number_eval_size", "10", "inf"))),
    Command("train_translation", parse_translation_args, [*MODULE, "rskip.commands.train_translation"],
            TRANSLATION_BASE, TRANSLATION_NUMBERS),
    Command("train_image_classification", parse_image_classification_args,
            [*MODULE, "rskip.commands.train_image_classification"], IMAGE_BASE, IMAGE_NUMBERS),
    Command("trainer_translation",
            lambda argv: parse_trainer_args(Seq2SeqTrainingArguments, parse_translation_args, argv),
            [sys.executable, str(REPO / "scripts" / "trainer_translation.py")], TRANSLATION_BASE,
            trainer_table(TRAINER_NUMBERS + SEQ2SEQ_NUMBERS, TRANSLATION_NUMBERS)),
    Command("trainer_image_classification",
            lambda argv: parse_trainer_args(TrainingArguments, parse_image_classification_args, argv),
            [sys.executable, str(REPO / "scripts" / "trainer_image_classification.py")], IMAGE_BASE,
            trainer_table(TRAINER_NUMBERS, IMAGE_NUMBERS)),
]
BAD_NUMBERS = ("0", "-1", "not-a-number")


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A folder that passes as a finished run's (results.json); commands' arguments named RUN become it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # output folders given as relative paths land here
    return run


def argv_of(command: Command, run: Path, *extra: str) -> list[str]:
    return [str(run) if word == "RUN" else word for word in command.base] + list(extra)


def refused(command: Command, argv: list[str], capsys) -> str:
    """The last line of the usage error with which `command` refuses `argv`."""
    with pytest.raises(SystemExit) as exit_info:
        command.parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "usage: " in err, err
    return err.strip().splitlines()[-1]


NUMBER_CASES = [pytest.param(command, row, value, id=f"{command.name} {row.flag} {value}")
                for command in COMMANDS for row in command.numbers
                for value in (*BAD_NUMBERS, row.out_of_range)]


@pytest.mark.parametrize("command, row, value", NUMBER_CASES)
def test_every_numeric_flag_refuses_what_it_does_not_take(finished_run, capsys, command, row, value):
    argv = argv_of(command, finished_run, *row.needs, row.flag, value)
    if value in row.allows:
        command.parse(argv)  # 0 or -1 is a value this flag takes
        return
    line = refused(command, argv, capsys)
    assert f"argument {row.flag}" in line and value in line, line


@pytest.mark.parametrize("command, row", [pytest.param(command, row, id=f"{command.name} {row.flag}")
                                          for command in COMMANDS for row in command.numbers])
def test_every_numeric_flag_takes_its_valid_example(finished_run, command, row):
    command.parse(argv_of(command, finished_run, *row.needs, row.flag, row.valid))


def numeric_flags(command: Command, run: Path, monkeypatch) -> set[str]:
    """The flags of the command's parsers whose type turns a number into a number: its numeric flags, read from the
    parsers themselves."""
    parsers = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    command.parse(argv_of(command, run))
    flags = set()
    for parser in parsers[:command.own_parsers]:
        for action in parser._actions:
            if action.type is None or not action.option_strings:
                continue
            for probe in ("1", "0.5", "100"):
                try:
                    value = action.type(probe)
                except Exception:
                    continue
                if isinstance(value, (int, float, tuple)) and not isinstance(value, bool):
                    flags.add(action.option_strings[0])
            try:  # a narrow range (an ONNX opset) takes none of the probes; its message says it wants a number
                action.type("not-a-number")
            except argparse.ArgumentTypeError as error:
                if str(error).startswith(("expected an integer", "expected a number")):
                    flags.add(action.option_strings[0])
            except Exception:
                pass
    return flags


@pytest.mark.parametrize("command", COMMANDS, ids=[command.name for command in COMMANDS])
def test_the_table_lists_every_numeric_flag_of_every_command(finished_run, monkeypatch, command):
    flags = numeric_flags(command, finished_run, monkeypatch)
    assert flags == {row.flag for row in command.numbers}


def test_the_table_holds_every_installed_command():
    assert {f"rskip.commands.{command.name}" for command in COMMANDS} >= set(INSTALLED_COMMANDS.values())


# Paths and choices: (command, arguments, what the last line must say). A file named "a-file" exists.
PATH_AND_CHOICE_CASES = [
    ("benchmark", ["--family", "gpt"], "argument --family: invalid choice: 'gpt'"),
    ("benchmark", ["--image_model", "resnet9000"], "argument --image_model: invalid choice: 'resnet9000'"),
    ("benchmark", ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ("benchmark", ["--device", "tpu"], "argument --device: expected "),
    ("benchmark", ["--output_dir", "a-file"], "argument --output_dir: 'a-file' is a file"),
    ("reproduce", ["--models", "preact_resnet20"], "argument --models: not used by gradients"),
    ("reproduce", ["--variants", "rskip"], "argument --variants: invalid choice: 'rskip'"),
    ("reproduce", ["--translation_preset", "wmt14"], "argument --translation_preset: not used by gradients"),
    ("reproduce", ["--output_dir", "a-file"], "argument --output_dir: 'a-file' is a file"),
    ("reproduce", ["--converged"], "argument --converged: not used by gradients; it goes with cifar"),
    ("demo", ["--model_preset", "big"], "argument --model_preset: invalid choice: 'big'"),
    ("demo", ["--output_dir", "a-file"], "argument --output_dir: 'a-file' is a file"),
    ("demo", ["--config_overrides", "d_model=30"], "argument --config_overrides: 'd_model=30': d_model=30 is not "),
    ("demo", ["--extra_args=--num_beams 0"], "argument --extra_args: argument --num_beams: expected an integer >= 1"),
    ("compare_runs", ["--output", "curves.txt"], "argument --output: 'curves.txt' is not an image file name"),
    ("compare_runs", ["--output", "missing/curves.png"], "argument --output: 'missing/curves.png': its folder"),
    ("model_card", ["--baseline", "missing"], "argument --baseline: 'missing' is not a finished training run's"),
    ("model_card", ["--repo_id", "a b"], "argument --repo_id: 'a b' is not a Hub repository id"),
    ("train_translation", ["--lr_scheduler_type", "steps"], "argument --lr_scheduler_type: invalid choice: 'steps'"),
    ("train_translation", ["--skip_variant", "rskip"], "argument --skip_variant: invalid choice: 'rskip'"),
    ("train_translation", ["--bleu_tokenize", "x"], "argument --bleu_tokenize: invalid choice: 'x'"),
    ("train_translation", ["--output_dir", "a-file"], "argument --output_dir: 'a-file' is a file"),
    ("train_image_classification", ["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
    ("train_image_classification", ["--augmentation", "x"], "argument --augmentation: invalid choice: 'x'"),
    ("trainer_translation", ["--lr_scheduler_type", "steps"], "argument --lr_scheduler_type"),
    ("trainer_image_classification", ["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
]
COMMANDS_BY_NAME = {command.name: command for command in COMMANDS}


@pytest.mark.parametrize("name, extra, message", PATH_AND_CHOICE_CASES)
def test_a_bad_path_or_choice_is_refused_naming_the_flag(finished_run, capsys, name, extra, message):
    (finished_run.parent / "a-file").write_text("")
    line = refused(COMMANDS_BY_NAME[name], argv_of(COMMANDS_BY_NAME[name], finished_run, *extra), capsys)
    assert message in line, line


@pytest.mark.parametrize("name, positional, message", [
    ("compare_runs", ["missing"], "argument run_dirs: 'missing' is not a finished training run's output folder"),
    ("model_card", ["missing"], "argument output_dir: 'missing' is not a finished training run's output folder"),
    ("push_to_hub", ["missing", "user/name"], "argument run_dir: 'missing' is not a finished training run's"),
    ("push_to_hub", ["RUN", "a/b/c"], "argument repo_id: 'a/b/c' is not a Hub repository id"),
    ("reproduce", ["cifar", "--data_dir", "missing"], "argument --data_dir: 'missing' has no cifar10/train.parquet"),
    ("reproduce", ["translation", "--data_dir", "missing"], "argument --data_dir: 'missing' has no "
                                                            "multi30k/train.en[.gz]"),
    ("reproduce", ["sweep"], "argument experiment: invalid choice: 'sweep'"),
    ("reproduce", ["depth", "--full"], "argument --full: depth has the presets --mini, --quick; on a GPU, "
                                       "scripts/gpu_evidence.sh runs it at width 256"),
    ("reproduce", ["depth", "--variants", "pre_ln"], "argument --variants: not used by depth"),
    ("reproduce", ["cifar", "--converged", "--full"], "argument --full: cifar --converged has the presets --quick "
                                                      "and --mini"),
])
def test_a_bad_positional_argument_is_refused_naming_it(finished_run, capsys, name, positional, message):
    argv = [str(finished_run) if word == "RUN" else word for word in positional]
    line = refused(Command(name, COMMANDS_BY_NAME[name].parse, [], []), argv, capsys)
    assert message in line, line


@pytest.mark.parametrize("command", COMMANDS, ids=[command.name for command in COMMANDS])
def test_as_a_user_starts_it_a_bad_value_is_usage_and_one_line(finished_run, command):
    """The command as a user starts it, in a fresh process: exit status 2, usage, one error line, no traceback."""
    flag, value = (command.numbers[0].flag, "0") if command.numbers else ("--no_such_flag", "0")
    completed = subprocess.run([*command.entry, *argv_of(command, finished_run, flag, value)], capture_output=True,
                               text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 2, completed.stderr[-3000:]
    lines = completed.stderr.strip().splitlines()
    assert any(line.startswith("usage: ") for line in lines) and "Traceback" not in completed.stderr, \
        completed.stderr[-3000:]
    assert [line for line in lines if " error: " in line] == [lines[-1]] and flag in lines[-1], lines[-1]
