"""scripts/trainer_image_classification.py: RSkipResNet trained by transformers' Trainer with the same data, model and
augmentation flags."""

import json

from PIL import Image
from transformers import pipeline

import trainer_image_classification
from image_helpers import CIFAR10_CLASSES, cifar_parquet, one_torch_thread  # fixtures: cifar_parquet, one_torch_thread
from rskip import RSkipResNetForImageClassification


def test_trainer_trains_evaluates_and_saves_an_rskip_resnet(tmp_path, cifar_parquet):
    output_dir = tmp_path / "out"
    metrics = trainer_image_classification.main([
        "--train_file", str(cifar_parquet), "--validation_size", "16", "--max_train_samples", "48",
        "--model", "preact_resnet20", "--skip_variant", "rskip_ln", "--skip_recursions", "3",
        "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "16", "--learning_rate", "0.1",
        "--weight_decay", "1e-4", "--lr_scheduler_type", "cosine", "--eval_strategy", "steps", "--eval_steps", "3",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no",
    ])
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["eval_top1"] == metrics["eval_top1"] and 0 <= saved["eval_top1"] <= 100
    assert saved["eval_loss"] == metrics["eval_loss"] < 10

    model = RSkipResNetForImageClassification.from_pretrained(output_dir)
    assert (model.config.backbone, model.config.skip_variant, model.config.skip_recursions) == (
        "preact_resnet20", "rskip_ln", 3)
    classify = pipeline("image-classification", model=str(output_dir), trust_remote_code=True)
    assert {result["label"] for result in classify(Image.new("RGB", (32, 32)), top_k=10)} == set(CIFAR10_CLASSES)
