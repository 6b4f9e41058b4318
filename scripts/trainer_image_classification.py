"""Train RSkipResNetForImageClassification with transformers' `Trainer` instead of our Accelerate loop.

The data, model and augmentation flags are `train_image_classification.py`'s (`rskip.training.cli`) (`--train_file`, `--dataset_name`,
`--model`, `--skip_variant`, `--augmentation`...), as are `--optimizer` and `--momentum`; every other flag is a
`TrainingArguments` field. For example, He et al.'s recipe on CIFAR-10 with a cosine schedule:

    python scripts/trainer_image_classification.py --train_file ../shared/data/cifar10/train.parquet \
        --model preact_resnet56 --skip_variant rskip_ln --output_dir runs/c10-trainer \
        --num_train_epochs 164 --per_device_train_batch_size 128 --learning_rate 0.1 --weight_decay 1e-4 \
        --lr_scheduler_type cosine --eval_strategy epoch --save_strategy epoch --report_to none

The optimizer is timm's (SGD with momentum 0.9 by default), which leaves norms and biases out of weight decay (the
Trainer's own would decay BatchNorm weights); the schedule is the Trainer's (--lr_scheduler_type, --warmup_steps).
The random augmentation draws from the data-loader workers' generators, which the Trainer seeds.
RSkipResNetForImageClassification sets `accepts_loss_kwargs = False`, so the Trainer divides the loss by the
gradient-accumulation steps.
"""

import numpy as np
from timm.optim import create_optimizer_v2
from transformers import Trainer, TrainingArguments

from rskip.training.cli import parse_image_classification_args, parse_trainer_args, run_main
from rskip.training.image_classification import (
    ImageClassificationDataset,
    build_model,
    build_transforms,
    load_raw_datasets,
)


def compute_metrics(prediction):
    return {"top1": 100 * float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main(argv=None):
    training_args, args = parse_trainer_args(TrainingArguments, parse_image_classification_args, argv)

    with training_args.main_process_first():
        raw = load_raw_datasets(args)
    model = build_model(args, raw["train"].features["label"].names)
    _, train_transform, eval_transform = build_transforms(model.timm_model, args.augmentation, args.crop_padding)
    optimizer = create_optimizer_v2(model, opt=args.optimizer, lr=training_args.learning_rate,
                                    weight_decay=training_args.weight_decay, momentum=args.momentum)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ImageClassificationDataset(raw["train"], train_transform, "training data"),
        eval_dataset=ImageClassificationDataset(raw["validation"], eval_transform, "validation data"),
        compute_metrics=compute_metrics,
        optimizers=(optimizer, None),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # RSkipResNetForImageClassification.save_pretrained: also the image processor
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
