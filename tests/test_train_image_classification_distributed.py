"""`accelerate launch -m rskip.commands.train_image_classification` with two processes (DDP over gloo, on CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import default_collate

from rskip.commands import train_image_classification as train
from rskip.training import image_classification
from rskip.training.cli import parse_image_classification_args
from image_helpers import cifar_parquet, one_torch_thread, tiny_args  # fixtures: cifar_parquet, one_torch_thread
from rskip import RSkipResNetForImageClassification

# `accelerate launch` through this interpreter: no assumption about where the environment put its console scripts.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def validate(model_dir, checkpoint, cifar_parquet) -> tuple[float, float]:
    """Top-1 accuracy and loss of a checkpoint's weights on the validation images, in this process."""
    model = RSkipResNetForImageClassification.from_pretrained(model_dir).eval()
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    raw = image_classification.load_raw_datasets(parse_image_classification_args(tiny_args(cifar_parquet, "unused", "--validation_size", "15")))
    *_, eval_transform = image_classification.build_transforms(model.timm_model)
    images = image_classification.ImageClassificationDataset(raw["validation"], eval_transform, "validation data")
    batch = default_collate([images[index] for index in range(len(images))])
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    top1 = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    return round(100 * top1, 2), round(F.cross_entropy(logits, batch["labels"]).item(), 4)


def test_two_processes_train_as_one_process_accumulating_two_micro_batches(tmp_path, cifar_parquet):
    """Each process takes every other batch; the loss is the mean over both processes' images, so two processes make
    the same updates as one process accumulating the same two batches (BatchNorm normalises each batch by its own
    statistics either way). The running statistics differ: DDP keeps the main process's."""
    common = ["--validation_size", "15", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
              "--checkpointing_steps", "4"]
    # `--cpu` would make `accelerate launch` start a single process: torchrun's launcher, told to stay on the CPU.
    command = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "0",  # a free port: tests may run side by side
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "rskip.commands.train_image_classification", *tiny_args(cifar_parquet, tmp_path / "ddp", *common)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "3 updates per epoch of 8 images x 2 processes x 1 accumulation" in completed.stdout
    assert sorted(path.name for path in (tmp_path / "ddp" / "checkpoints" / "step_4").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_rskip_resnet.py",
                 "results.json", "validation_curves.png"):
        assert (tmp_path / "ddp" / name).is_file(), name
    # Every validation image is counted exactly once, whatever the sharding (15 images in batches of 4 per process),
    # and every process normalises with the saved running statistics (DDP broadcasts the main process's buffers at
    # each forward pass).
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["validation"]["images"] == 15
    top1, loss = validate(tmp_path / "ddp", tmp_path / "ddp" / "checkpoints" / "step_4", cifar_parquet)
    assert results["history"][-1]["top1"] == top1 and results["history"][-1]["loss"] == pytest.approx(loss, abs=2e-4)

    train.main(tiny_args(cifar_parquet, tmp_path / "single", *common, "--gradient_accumulation_steps", "2"))

    weights = {run: load_file(tmp_path / run / "checkpoints" / "step_4" / "model.safetensors")
               for run in ("ddp", "single")}
    parameters = [name for name in weights["ddp"] if not name.endswith(BATCHNORM_STATISTICS)]
    assert len(parameters) > 60
    for name in parameters:
        torch.testing.assert_close(weights["ddp"][name], weights["single"][name], rtol=1e-5, atol=1e-6, msg=name)
