"""Train an image classifier whose residual connections come from the family of Liu et al., "Rethinking Skip
Connection with Layer Normalization in Transformers and ResNets" (COLING 2020) -- by default rSkip+LN,
y = LN_2(x + LN_1(x + F(x))) -- with Accelerate: one process, many GPUs or many machines.

    # CIFAR-10 from the Hub, on the paper's PreAct-ResNet-110
    accelerate launch rskip-train-image-classification --dataset_name uoft-cs/cifar10 \
        --model preact_resnet110 --skip_variant rskip_ln --output_dir runs/c10-rskip
    # a local parquet file (validation: its last rows), or image folders (one subfolder per class)
    rskip-train-image-classification --train_file ../shared/data/cifar10/train.parquet \
        --model preact_resnet20 --skip_variant post_ln --output_dir runs/c10-post-ln
    accelerate launch rskip-train-image-classification --train_dir imagenette/train \
        --validation_dir imagenette/val --model resnet50.a1_in1k --pretrained --skip_variant rskip_ln ...

The flags are in `rskip.training.cli`, the task (data, augmentation, model, evaluation) in
`rskip.training.image_classification`, the run in `rskip.training.train`. The output folder ends up a Hub-ready
model folder (the best checkpoint by validation top-1 accuracy, with its custom code, class names and image
processor) plus `results.json`; `checkpoints/` holds resumable training states.
"""

from rskip.training import TrainingConfig, train
from rskip.training.cli import command_line, parse_image_classification_args, run_main
from rskip.training.image_classification import ImageClassificationTask


def main(argv=None):
    args = parse_image_classification_args(argv)
    return train(ImageClassificationTask(args), TrainingConfig.from_args(args), command_line("rskip-train-image-classification", argv))


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    run_main(main)


if __name__ == "__main__":
    run()
