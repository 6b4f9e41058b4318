"""scripts/train_image_classification.py on bad input: one clear message naming what is wrong, and nothing lost."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rskip.commands import train_image_classification as train
from rskip.training import image_classification
from rskip.training.cli import parse_image_classification_args
from conftest import REPO
from image_helpers import (  # fixtures: cifar_parquet, one_torch_thread
    cifar_parquet,
    cifar_rows,
    one_torch_thread,
    tiny_args,
    write_image_folder,
)
from rskip.training import TrainingError
from rskip.training.checkpoints import list_checkpoints


def load(*args):
    return image_classification.load_raw_datasets(parse_image_classification_args(["--output_dir", "x", *map(str, args)]))


def test_missing_files_and_folders_are_named(tmp_path, cifar_parquet):
    for flags, message in [
        (["--train_file", tmp_path / "missing.parquet"], r"missing\.parquet: no such file"),
        (["--train_file", cifar_parquet, "--validation_file", tmp_path / "nowhere.parquet"],
         r"nowhere\.parquet: no such file"),
        (["--train_dir", tmp_path / "no-folder"], r"no-folder: no such folder"),
        (["--dataset_name", tmp_path / "no-dataset"], r"cannot load --dataset_name .*no-dataset"),
    ]:
        with pytest.raises(TrainingError, match=message):
            load(*flags)


def test_unreadable_files_and_folders_without_images_are_named(tmp_path):
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(TrainingError, match=r"cannot read .*broken\.parquet: ArrowInvalid"):
        load("--train_file", tmp_path / "broken.parquet")
    (tmp_path / "texts" / "cat").mkdir(parents=True)
    (tmp_path / "texts" / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(TrainingError, match=r"no images in .*texts \(expected .*texts/<class name>/<image file>\)"):
        load("--train_dir", tmp_path / "texts")


def test_an_unreadable_image_stops_the_run_before_training_naming_it(tmp_path):
    images = [image for image, _ in cifar_rows(0, 6)]
    write_image_folder(tmp_path / "train", {"cat": images[:3], "dog": images[3:]})
    (tmp_path / "train" / "dog" / "1.png").write_bytes(b"truncated")
    with pytest.raises(TrainingError, match=r"training data: .*train/dog/1\.png \(row \d\) is not a readable image "
                                            r"\(PIL cannot identify its format\)"):
        train.main(["--train_dir", str(tmp_path / "train"), "--validation_size", "1", "--model", "preact_resnet20",
                    "--per_device_train_batch_size", "8", "--max_train_steps", "1",
                    "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "best_model").exists()


def test_missing_columns_are_named_with_the_columns_there_are(tmp_path, cifar_parquet):
    with pytest.raises(TrainingError, match=r"has no column 'picture' \(--image_column\); its columns are: img, label"):
        load("--train_file", cifar_parquet, "--image_column", "picture")
    with pytest.raises(TrainingError,
                       match=r"has no column 'fine_label' \(--label_column\); its columns are: img, label"):
        load("--train_file", cifar_parquet, "--label_column", "fine_label")
    with pytest.raises(TrainingError, match=r"'label' cannot be both the image and the label column"):
        load("--train_file", cifar_parquet, "--image_column", "label")
    with pytest.raises(TrainingError, match=r"column 'label' must hold images and 'img' class labels"):
        load("--train_file", cifar_parquet, "--image_column", "label", "--label_column", "img")

    (tmp_path / "flat").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / name)
    with pytest.raises(TrainingError, match=r"flat has no column named label or labels; name the label column with "
                                            r"--label_column \(its columns are: image\)"):
        load("--train_dir", tmp_path / "flat")
    table = pq.read_table(cifar_parquet).slice(0, 4)
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    coarse = {"_type": "ClassLabel", "names": ["animal", "vehicle"]}
    schema = pa.schema([table.schema.field("img"), ("fine_label", pa.int64()), ("coarse_label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": {
                           "img": features["img"], "fine_label": features["label"], "coarse_label": coarse}}})})
    pq.write_table(pa.table([table.column("img"), table.column("label"), pa.array([0, 1, 0, 1])], schema=schema),
                   tmp_path / "cifar100-like.parquet")
    with pytest.raises(TrainingError, match=r"has several ClassLabel columns \(fine_label, coarse_label\); name the "
                                            r"label column with --label_column"):
        load("--train_file", tmp_path / "cifar100-like.parquet")
    assert load("--train_file", tmp_path / "cifar100-like.parquet", "--label_column", "coarse_label",
                "--validation_size", "1")["train"].features["label"].names == ["animal", "vehicle"]


def test_num_labels_must_match_the_dataset(cifar_parquet):
    with pytest.raises(TrainingError, match=r"--num_labels 5, but .*train\.parquet has 10 classes: airplane, "
                                            r"automobile, bird, .*truck"):
        load("--train_file", cifar_parquet, "--num_labels", "5")
    assert len(load("--train_file", cifar_parquet, "--num_labels", "10")["train"]) == 180


def test_validation_classes_must_be_training_classes(tmp_path):
    rows = [image for image, _ in cifar_rows(0, 3)]
    write_image_folder(tmp_path / "train", {"cat": rows[:1], "dog": rows[1:2]})
    write_image_folder(tmp_path / "val", {"dog": rows[:1], "zebra": rows[1:2], "yak": rows[2:]})
    with pytest.raises(TrainingError, match=r"val has classes that .*train lacks: yak, zebra"):
        load("--train_dir", tmp_path / "train", "--validation_dir", tmp_path / "val")


def test_a_validation_size_that_leaves_no_training_images(cifar_parquet):
    with pytest.raises(TrainingError, match=r"--validation_size 200 leaves no training or no validation images: "
                                            r".*train\.parquet has 200 images and no validation split"):
        load("--train_file", cifar_parquet, "--validation_size", "200")


def test_pretrained_weights_that_cannot_be_loaded_are_named():
    for model, message in [("resnet18.a1_in1k", "cannot load pretrained weights for --model resnet18.a1_in1k: "),
                           ("preact_resnet20", "No pretrained weights exist for preact_resnet20")]:
        with pytest.raises(TrainingError, match=message):
            image_classification.build_model(parse_image_classification_args(["--train_file", "x", "--output_dir", "out", "--model", model,
                                                "--pretrained"]), ["a", "b"])


@pytest.mark.parametrize("flags, message", [
    (["--skip_recursions", "0"], "argument --skip_recursions: skip_recursions=0 is not a valid recursion depth K; allowed: an integer >= 1"),
    (["--skip_variant", "post_ln", "--skip_recursions", "3"],
     "argument --skip_recursions: skip_recursions=3 is set but skip_variant='post_ln' does not use it"),
    (["--skip_variant", "plain", "--skip_norm_dims", "c"],
     "argument --skip_norm_dims: skip_norm_dims='c' is set but skip_variant='plain' does not use it"),
    (["--skip_variant", "rskip"], "argument --skip_variant: invalid choice: 'rskip' (choose from 'plain', 'post_ln'"),
    (["--model", "vit_tiny_patch16_224"],
     "argument --model: vit_tiny_patch16_224 cannot take a skip connection (--skip_*): "
     "architecture='vit_tiny_patch16_224' has no rskip counterpart; allowed: preact_resnet20, preact_resnet56"),
    (["--checkpointing_steps", "often"], "argument --checkpointing_steps: expected a number of steps or 'epoch', "
                                         "got 'often'"),
    (["--eval_steps", "0"], "argument --eval_steps: expected a number of steps or 'epoch', got '0'"),
    (["--validation_size", "1.5"], "argument --validation_size: expected a fraction between 0 and 1 or a number of "
                                   "images, got '1.5'"),
    (["--lr_decay_milestones", "0.5", "75"], "argument --lr_decay_milestones: expected a number > 0 and < 1, "
                                             "got '75'"),
    (["--dataset_name", "uoft-cs/cifar10"], "give one of --dataset_name, --train_file (parquet) or --train_dir "
                                            "(image folder), not --dataset_name and --train_file"),
    (["--validation_dir", "val"], "--validation_dir goes with --train_dir"),
])
def test_bad_command_lines_name_the_flag_value_and_allowed_values(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_image_classification_args(["--train_file", "x", "--output_dir", "out", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_resume_path_that_is_not_a_checkpoint_is_refused(tmp_path, cifar_parquet):
    (tmp_path / "not-a-checkpoint").mkdir()
    for path, message in [(tmp_path / "not-a-checkpoint", r"is not a checkpoint of this project \(it has no "
                                                          r"run_state\.json\)"),
                          (tmp_path / "nowhere", "nowhere: no such folder")]:
        with pytest.raises(TrainingError, match=message):
            train.main(tiny_args(cifar_parquet, tmp_path / "run", "--resume_from_checkpoint", path))


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, cifar_parquet):
    args = tiny_args(cifar_parquet, tmp_path / "run", "--checkpointing_steps", "2", "--max_train_steps", "2")
    train.main(args)
    with pytest.raises(TrainingError, match=r"checkpoint .*step_2 belongs to another configuration.*\n"
                                            r"  skip_variant: None in the checkpoint, 'post_ln' now"):
        train.main([*args, "--skip_variant", "post_ln", "--resume_from_checkpoint",
                    str(tmp_path / "run" / "checkpoints" / "step_2")])
    # `latest` looks only at this run's checkpoints: the folder holds another run, which is not replaced silently.
    with pytest.raises(TrainingError, match=r"--output_dir .*run holds a finished run \(results.json\); pass "
                                            r"--overwrite_output_dir.*\n  skip_variant: None in the checkpoint, "
                                            r"'post_ln' now"):
        train.main([*args, "--skip_variant", "post_ln", "--resume_from_checkpoint", "latest"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cifar_parquet):
    """An absurd learning rate makes the loss NaN at the second update."""
    output_dir = tmp_path / "run"
    args = tiny_args(cifar_parquet, output_dir, "--learning_rate", "1e30", "--checkpointing_steps", "1")
    with pytest.raises(TrainingError, match=r"the training loss is nan at step 2; .*the last good checkpoint is "
                                            r".*checkpoints/step_1\)"):
        train.main(args)
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_1"]
    assert json.loads((output_dir / "checkpoints" / "step_1" / "run_state.json").read_text())["step"] == 1
    assert not (output_dir / "results.json").exists()


def test_the_command_line_reports_errors_without_a_traceback(tmp_path, cifar_parquet):
    command = [sys.executable, str(REPO / "scripts" / "train_image_classification.py"),
               *tiny_args(cifar_parquet, tmp_path / "run", "--label_column", "category")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: {cifar_parquet} has no column 'category' (--label_column); its columns are: img, label")
    assert "Traceback" not in completed.stderr
