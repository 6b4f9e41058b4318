"""`accelerate launch -m rskip.commands.train_translation` (and the clone's scripts/train_translation.py) with two
processes on CPU (gloo): DDP and FSDP."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from rskip.commands import train_translation
from rskip.training import translation
from rskip.training.cli import parse_translation_args
from conftest import REPO
from translation_helpers import tiny_args, write_pairs

# `accelerate launch` through this interpreter: no assumption about where the environment put its console scripts.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def test_two_processes_train_as_one_process_accumulating_two_micro_batches(tmp_path, multi30k_dir, marian_tokenizer):
    """Each process takes every other batch; the loss is normalised by the tokens of both processes' batches, so two
    processes make the same updates as one process accumulating the same two batches (dropout off: the processes
    draw different dropout masks). Three updates: the epoch's 7th and last batch would be paired, with two processes,
    with a repeat of its first (Accelerate's even_batches)."""
    data = write_pairs(tmp_path / "data", multi30k_dir)
    common = ["--config_overrides", "dropout=0.0", "--max_train_steps", "3", "--checkpointing_steps", "3"]
    # `--cpu` would make `accelerate launch` start a single process: torchrun's launcher, told to stay on the CPU.
    command = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "0",  # a free port: tests may run side by side
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rskip.commands.train_translation",
               *tiny_args(data, tmp_path / "ddp", marian_tokenizer.name_or_path, *common)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "x 2 processes x 1 accumulation" in completed.stdout
    assert sorted(path.name for path in (tmp_path / "ddp" / "checkpoints" / "step_3").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]

    train_translation.main(tiny_args(data, tmp_path / "single", marian_tokenizer.name_or_path, *common,
                                     "--gradient_accumulation_steps", "2"))

    weights = {run: load_file(tmp_path / run / "checkpoints" / "step_3" / "model.safetensors")
               for run in ("ddp", "single")}
    for name, tensor in weights["ddp"].items():
        torch.testing.assert_close(tensor, weights["single"][name], rtol=1e-5, atol=1e-6, msg=name)
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("ddp", "single")}
    for ddp, single in zip(results["ddp"]["history"], results["single"]["history"]):
        assert abs(ddp["loss"] - single["loss"]) < 1e-3
    # Every validation sentence is translated exactly once, whatever the sharding.
    assert len((tmp_path / "ddp" / "predictions_validation.txt").read_text().splitlines()) == 8


def test_fsdp2_trains_checkpoints_and_resumes(tmp_path, multi30k_dir, marian_tokenizer):
    """FSDP (version 2) over two CPU processes: sharded training, validation, checkpoints, resume, test."""
    data = write_pairs(tmp_path / "data", multi30k_dir)
    launch = [*ACCELERATE_LAUNCH, "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
              "--main_process_port", "0",  # a free port: tests may run side by side
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_transformer_layer_cls_to_wrap", "RSkipMarianEncoderLayer,RSkipMarianDecoderLayer",
              "--fsdp_cpu_ram_efficient_loading", "false", str(REPO / "scripts" / "train_translation.py"),
              *tiny_args(data, tmp_path / "fsdp", marian_tokenizer.name_or_path, "--checkpointing_steps", "2",
                         "--test_file", data / "test")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for extra in (["--max_train_steps", "2"], ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]):
        completed = subprocess.run([*launch, *extra], capture_output=True, text=True, timeout=300, env=env)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Resumed from" in completed.stdout and "x 2 processes" in completed.stdout
    results = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert results["steps"] == 4 and [record["step"] for record in results["history"]] == [2, 4]
    assert len((tmp_path / "fsdp" / "predictions_test.txt").read_text().splitlines()) == 8
