"""scripts/train_image_classification.py: a complete run's output folder, the data formats, He et al.'s recipe
(augmentation, optimizer, schedule), stop-and-resume equality, starting from a pretrained stock timm ResNet."""

import io
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import pipeline

from rskip.commands import train_image_classification as train
from rskip.training import image_classification
from rskip.training.cli import parse_image_classification_args
from conftest import REPO
from image_helpers import (  # fixtures: cifar_parquet, one_torch_thread
    CIFAR10_CLASSES,
    cifar_parquet,
    cifar_rows,
    one_torch_thread,
    tiny_args,
    write_image_folder,
)
from rskip import RSkipResNetForImageClassification
from rskip.timm_resnets import CIFAR10_MEAN, CIFAR10_STD
from rskip.training.checkpoints import list_checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_parquet):
    """A whole run on 48 CIFAR-10 images: validation carved from the file, tracking on, a mocked push to the Hub."""
    output_dir = tmp_path_factory.mktemp("run") / "c10-rskip"
    args = tiny_args(cifar_parquet, output_dir, "--skip_variant", "rskip_ln", "--skip_recursions", "3",
                     "--max_train_steps", "6", "--eval_steps", "3", "--checkpointing_steps", "epoch", "--with_tracking",
                     "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "someone/c10-rskip")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value="https://hub/someone/c10-rskip") as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder") as upload, \
            mock.patch("huggingface_hub.HfApi.auth_check"), mock.patch.dict("os.environ", {"HF_TOKEN": "hf_test"}):
        results = train.main(args)
    return output_dir, results, create, upload


def test_output_folder_is_a_hub_ready_model(finished_run):
    output_dir, results, _, _ = finished_run
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["model_type"], config["backbone"]) == ("rskip_resnet", "preact_resnet20")
    assert (config["skip_variant"], config["skip_recursions"]) == ("rskip_ln", 3)
    assert config["id2label"] == {str(index): name for index, name in enumerate(CIFAR10_CLASSES)}
    assert config["auto_map"]["AutoModelForImageClassification"] == \
        "modeling_rskip_resnet.RSkipResNetForImageClassification"
    for code in ("configuration_rskip_resnet.py", "modeling_rskip_resnet.py", "timm_resnets.py", "residual.py"):
        assert (output_dir / code).is_file()
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(CIFAR10_MEAN) and processor["crop_size"] == {"height": 32, "width": 32}
    assert (output_dir / "validation_curves.png").stat().st_size > 0


def test_pipeline_classifies_as_validation_did_with_the_dataset_class_names(finished_run):
    """The saved image processor repeats the validation transform: the pipeline's scores are the model's
    probabilities for the image as the script validated it."""
    output_dir, *_ = finished_run
    image = cifar_rows(199, 200)[0][0]
    scores = {result["label"]: result["score"]
              for result in pipeline("image-classification", model=str(output_dir), trust_remote_code=True)(
                  image, top_k=10)}
    model = RSkipResNetForImageClassification.from_pretrained(output_dir).eval()
    *_, eval_transform = image_classification.build_transforms(model.timm_model)
    with torch.no_grad():
        probabilities = model(eval_transform(image)[None]).logits.softmax(-1)[0]
    assert set(scores) == set(CIFAR10_CLASSES)
    for index, name in enumerate(CIFAR10_CLASSES):
        assert scores[name] == pytest.approx(probabilities[index].item(), abs=1e-5)


def test_results_hold_the_validation_history_and_the_best_step(finished_run):
    output_dir, results, _, _ = finished_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [record["step"] for record in saved["history"]] == [3, 6]
    assert [record["epoch"] for record in saved["history"]] == [1.0, 2.0]  # 48 images, batches of 16
    best = max(saved["history"], key=lambda record: (record["top1"], -record["loss"]))
    assert saved["best_step"] == best["step"] and saved["validation"]["top1"] == best["top1"]
    assert saved["validation"]["images"] == 24
    assert saved["skip"]["skip_recursions"] == 3 and saved["num_parameters"] > 250_000


def test_the_best_model_is_the_one_saved(finished_run):
    output_dir, results, _, _ = finished_run
    best = load_file(output_dir / "checkpoints" / f"step_{results['best_step']}" / "model.safetensors")
    saved = load_file(output_dir / "model.safetensors")
    assert saved.keys() == best.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, best[name]), name


def test_checkpoints_are_complete_and_temporary_folders_gone(finished_run):
    output_dir, *_ = finished_run
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_3", "step_6"]
    assert sorted(path.name for path in (output_dir / "checkpoints" / "step_6").iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "run_state.json", "scheduler.bin"]
    assert not list(output_dir.rglob(".tmp-*")) and not list(output_dir.rglob(".old-*"))


def test_optimizer_is_sgd_with_momentum_and_no_weight_decay_on_norms_and_biases(finished_run):
    output_dir, *_ = finished_run
    groups = torch.load(output_dir / "checkpoints" / "step_6" / "optimizer.bin")["param_groups"]
    model = RSkipResNetForImageClassification.from_pretrained(output_dir)
    weights = sum(parameter.ndim > 1 for parameter in model.parameters())  # convolutions and the classifier
    assert sorted((group["weight_decay"], len(group["params"])) for group in groups) == [
        (0.0, len(list(model.parameters())) - weights), (1e-4, weights)]
    assert all(group["momentum"] == 0.9 and not group["nesterov"] and group["initial_lr"] == 0.1
               for group in groups)


def test_tracking_writes_tensorboard_events(finished_run):
    output_dir, *_ = finished_run
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------------- data

def load(*args):
    return image_classification.load_raw_datasets(parse_image_classification_args(["--output_dir", "x", *args]))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_validation_is_carved_from_the_last_training_rows(cifar_parquet):
    table = pq.read_table(cifar_parquet)
    for size, count in (("0.1", 20), ("30", 30)):
        raw = load("--train_file", str(cifar_parquet), "--validation_size", size)
        assert (len(raw["train"]), len(raw["validation"])) == (200 - count, count)
        assert raw["validation"]["label"][:] == table.column("label").to_pylist()[200 - count:]
        assert raw["train"]["label"][:] == table.column("label").to_pylist()[:200 - count]
    assert raw["train"].features["label"].names == CIFAR10_CLASSES
    limited = load("--train_file", str(cifar_parquet), "--max_train_samples", "5", "--max_eval_samples", "3")
    assert limited["train"]["label"][:] == table.column("label").to_pylist()[:5]
    assert limited["validation"]["label"][:] == table.column("label").to_pylist()[180:183]


def test_reads_a_dataset_folder_as_from_the_hub(tmp_path, cifar_parquet):
    """`--dataset_name` goes through `load_dataset(name)`, as for uoft-cs/cifar10 (columns img and label); its
    validation split is used when it has one, and carved from train otherwise."""
    table = pq.read_table(cifar_parquet)
    pq.write_table(table.slice(0, 150), tmp_path / "train.parquet")
    pq.write_table(table.slice(150, 10), tmp_path / "validation.parquet")
    raw = load("--dataset_name", str(tmp_path))
    assert (len(raw["train"]), len(raw["validation"])) == (150, 10)
    assert raw["validation"]["label"][:] == table.column("label").to_pylist()[150:160]
    assert raw["train"].column_names == ["image", "label"]
    carved = load("--dataset_name", str(tmp_path), "--validation_split_name", "dev", "--validation_size", "50")
    assert (len(carved["train"]), len(carved["validation"])) == (100, 50)


def test_reads_image_folders_and_numbers_validation_classes_as_training_ones(tmp_path):
    rows = cifar_rows(0, 6)
    write_image_folder(tmp_path / "train", {"cat": [rows[0][0]], "dog": [rows[1][0]], "zebra": [rows[2][0]]})
    write_image_folder(tmp_path / "val", {"dog": [rows[3][0]], "zebra": [rows[4][0], rows[5][0]]})
    raw = load("--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"))
    assert raw["train"].features["label"].names == ["cat", "dog", "zebra"]
    assert raw["validation"].features["label"].names == ["cat", "dog", "zebra"]
    assert sorted(raw["validation"]["label"][:]) == [1, 2, 2]


def test_other_column_names_and_labels_that_are_not_class_labels(tmp_path):
    """Images stored as plain {bytes, path} structs and string labels (no datasets features): the image column is
    cast to Image, the labels become classes in sorted order, the validation file's are numbered alike."""
    rows = cifar_rows(0, 5)
    for name, labels in (("train", ["dog", "cat", "emu", "dog", "cat"]),
                         ("valid", ["emu", "cat", "emu", "dog", "dog"])):
        pq.write_table(pa.table({"id": list(range(5)), "labels": labels,
                                 "picture": [{"bytes": png_bytes(image), "path": None} for image, _ in rows]}),
                       tmp_path / f"{name}.parquet")
    raw = load("--train_file", str(tmp_path / "train.parquet"), "--validation_file", str(tmp_path / "valid.parquet"),
               "--image_column", "picture")
    assert raw["train"].features["label"].names == ["cat", "dog", "emu"]
    assert raw["train"]["label"][:] == [1, 0, 2, 1, 0] and raw["validation"]["label"][:] == [2, 0, 2, 1, 1]
    assert np.array_equal(np.asarray(raw["validation"][3]["image"]), np.asarray(rows[3][0]))


# ----------------------------------------------------------------------------------------- augmentation

def test_cifar_augmentation_is_a_random_crop_of_the_padded_image_and_a_random_flip():
    augmentation, train_transform, _ = image_classification.build_transforms(timm.create_model("preact_resnet20"))
    assert augmentation == "pad_crop_flip"
    image = cifar_rows(0, 1)[0][0]
    padded = F.pad(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255, (4, 4, 4, 4))
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    windows = {(top, left, flip): padded[:, top:top + 32, left:left + 32].flip(-1) if flip else
               padded[:, top:top + 32, left:left + 32] for top in range(9) for left in range(9) for flip in (0, 1)}
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        pixels = train_transform(image) * std + mean  # CIFAR-10's mean and std, from the model's pretrained_cfg
        matches = [key for key, window in windows.items() if torch.allclose(pixels, window, atol=1e-5)]
        assert matches, f"seed {seed}: not a 32x32 window of the padded image"
        seen.add(matches[0])
    assert {key[2] for key in seen} == {0, 1} and len({key[:2] for key in seen}) > 10


def test_imagenet_sized_models_get_timm_augmentation():
    augmentation, train_transform, eval_transform = image_classification.build_transforms(timm.create_model("rskip_resnet18"))
    assert augmentation == "timm"
    assert "RandomResizedCropAndInterpolation" in [type(step).__name__ for step in train_transform.transforms]
    image = Image.new("RGB", (300, 200))
    assert train_transform(image).shape == eval_transform(image).shape == (3, 224, 224)


def test_augmentation_depends_only_on_the_seed_epoch_and_image(cifar_parquet):
    """Each image's random crop and flip come from (seed, epoch, index): the same with and without data-loader
    workers, different in another epoch, and the process's own generator is left alone."""
    raw = load("--train_file", str(cifar_parquet), "--max_train_samples", "16")
    _, train_transform, _ = image_classification.build_transforms(timm.create_model("preact_resnet20"))
    dataset = image_classification.ImageClassificationDataset(raw["train"], train_transform, "training data", seed=0)
    state = torch.get_rng_state()
    first = dataset[3]["pixel_values"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(dataset[3]["pixel_values"], first) and not torch.equal(dataset[4]["pixel_values"], first)

    def epoch_pixels(workers):
        loader = DataLoader(dataset, batch_size=4, sampler=image_classification.EpochShuffle(len(dataset), seed=0),
                            num_workers=workers)
        return torch.cat([batch["pixel_values"] for batch in loader])

    assert torch.equal(epoch_pixels(0), epoch_pixels(2))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["pixel_values"], first)


def test_epoch_shuffle_is_a_permutation_drawn_from_seed_and_epoch():
    sampler = image_classification.EpochShuffle(50, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and order != list(range(50)) and len(sampler) == 50
    assert list(image_classification.EpochShuffle(50, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


# ------------------------------------------------------------------------------------ model and schedule

def parse(*args):
    return parse_image_classification_args(["--train_file", "x", "--output_dir", "out", *args])


def test_schedule_warms_up_then_divides_the_rate_by_ten_at_half_and_three_quarters():
    assert parse("--model", "preact_resnet110").num_warmup_steps == 400
    assert parse("--model", "preact_resnet56").num_warmup_steps == 0
    rates = {}
    for kind in ("step", "cosine"):
        args = parse("--num_warmup_steps", "4", "--lr_scheduler_type", kind)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = image_classification.create_scheduler(optimizer, args, max_train_steps=20)
        rates[kind] = []
        for _ in range(20):
            rates[kind].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert rates["step"] == pytest.approx([0.01] * 4 + [0.1] * 6 + [0.01] * 5 + [0.001] * 5)
    cosine = [0.1 * (1 + np.cos(np.pi * step / 20)) / 2 for step in range(20)]
    assert rates["cosine"] == pytest.approx([rate * 0.1 for rate in cosine[:4]] + cosine[4:])


def test_timm_resnet_names_are_the_same_networks_with_the_skip_connection():
    model = image_classification.build_model(parse("--model", "resnet18", "--skip_variant", "post_ln"), ["a", "b"])
    assert (model.config.backbone, model.config.skip_variant, model.config.num_labels) == (
        "rskip_resnet18", "post_ln", 2)
    stock = set(timm.create_model("resnet18", num_classes=2).state_dict())
    assert {key.removeprefix("timm_model.") for key in model.state_dict() if ".skip." not in key} == stock


def test_a_pretrained_stock_resnet_gets_the_skip_connection_and_a_new_classifier(tmp_path, capsys):
    """ImageNet-style: an image folder of images of any size and mode (grayscale, palette, RGBA: converted to RGB),
    timm's augmentation, a stock timm resnet18 checkpoint (save_for_hf folder, as from the Hub) with 7 classes.
    At learning rate 0 the convolutions stay the checkpoint's."""
    rows = cifar_rows(0, 9)
    images = [image.resize((40 + 8 * index, 36)) for index, (image, _) in enumerate(rows)]
    write_image_folder(tmp_path / "train", {"cat": [images[0].convert("L"), images[1]],
                                            "dog": [images[2].convert("P"), images[3]],
                                            "emu": [images[4].convert("RGBA"), images[5]]})
    write_image_folder(tmp_path / "val", {"cat": [images[6].convert("L")], "dog": [images[7]], "emu": [images[8]]})
    stock = timm.create_model("resnet18", num_classes=7)
    timm.models.save_for_hf(stock, tmp_path / "resnet18")
    train.main(["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"),
                "--model", str(tmp_path / "resnet18"), "--pretrained", "--skip_variant", "rskip_ln",
                "--learning_rate", "0", "--max_train_steps", "1", "--per_device_train_batch_size", "6",
                "--output_dir", str(tmp_path / "out")])
    assert "6 training and 3 validation images, 3 classes, timm augmentation" in capsys.readouterr().out
    model = RSkipResNetForImageClassification.from_pretrained(tmp_path / "out")
    assert (model.config.backbone, model.config.skip_variant) == ("rskip_resnet18", "rskip_ln")
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "emu"} and model.timm_model.fc.out_features == 3
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        assert torch.equal(model.timm_model.get_parameter(name), stock.get_parameter(name)), name
    assert model.timm_model.layer1[0].skip.recursion_norms[0].weight.eq(1).all()


# ----------------------------------------------------------------------------------------------- resume

def test_a_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path, cifar_parquet):
    """Run A trains 9 updates of 2 accumulated batches, 3 updates per epoch; run B stops at update 6 (its last
    checkpoint is update 4, mid-epoch), then resumes. Augmentation, data order, momentum, the schedule's warmup and
    BatchNorm statistics all carry over."""
    common = ["--max_train_samples", "72", "--gradient_accumulation_steps", "2", "--max_train_steps", "9",
              "--eval_steps", "epoch", "--checkpointing_steps", "4", "--num_warmup_steps", "2"]
    train.main(tiny_args(cifar_parquet, tmp_path / "a", *common))

    def stop_at_update_6(loss, step, output_dir):
        if step == 6:
            raise KeyboardInterrupt
    with mock.patch("rskip.training.loop.check_finite_loss", stop_at_update_6), pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(cifar_parquet, tmp_path / "b", *common))
    assert [path.name for path in list_checkpoints(tmp_path / "b")] == ["step_4"]
    train.main([*tiny_args(cifar_parquet, tmp_path / "b", *common), "--resume_from_checkpoint", "latest"])

    middle = json.loads((tmp_path / "b" / "checkpoints" / "step_4" / "run_state.json").read_text())
    assert (middle["epoch"], middle["batches_in_epoch"]) == (1, 2)
    states = {run: json.loads((tmp_path / run / "checkpoints" / "step_9" / "run_state.json").read_text())
              for run in "ab"}
    # The same state but for the seconds trained, which the resumed run adds up over its sittings.
    seconds = {run: states[run].pop("train_seconds") for run in "ab"}
    assert states["a"] == states["b"]
    assert seconds["b"] > middle["train_seconds"] > 0
    weights = {run: load_file(tmp_path / run / "model.safetensors") for run in "ab"}
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][name]), name
    optimizers = {run: torch.load(tmp_path / run / "checkpoints" / "step_9" / "optimizer.bin") for run in "ab"}
    for index, state in optimizers["a"]["state"].items():
        assert torch.equal(state["momentum_buffer"], optimizers["b"]["state"][index]["momentum_buffer"])
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in "ab"}
    assert [record["step"] for record in results["a"]["history"]] == [3, 6, 9]  # validation after each epoch
    assert results["a"]["history"] == results["b"]["history"] and results["a"]["best_step"] == results["b"]["best_step"]


def test_mixed_precision_bf16_trains(tmp_path, cifar_parquet):
    """In its own process: Accelerate keeps one precision per process."""
    command = [sys.executable, str(REPO / "scripts" / "train_image_classification.py"),
               *tiny_args(cifar_parquet, tmp_path / "bf16", "--mixed_precision", "bf16", "--max_train_steps", "2")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "mixed precision bf16" in completed.stdout
    results = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert results["args"]["mixed_precision"] == "bf16" and results["validation"]["loss"] < 10
