"""Train an image classifier whose residual connections come from the family of Liu et al., "Rethinking Skip
Connection with Layer Normalization in Transformers and ResNets" (COLING 2020) -- by default rSkip+LN,
y = LN_2(x + LN_1(x + F(x))) -- with Accelerate: one process, many GPUs or many machines.

    # CIFAR-10 from the Hub, on the paper's PreAct-ResNet-110
    accelerate launch scripts/train_image_classification.py --dataset_name uoft-cs/cifar10 \
        --model preact_resnet110 --skip_variant rskip_ln --output_dir runs/c10-rskip
    # a local parquet file (validation: its last rows), or image folders (one subfolder per class)
    python scripts/train_image_classification.py --train_file ../shared/data/cifar10/train.parquet \
        --model preact_resnet20 --skip_variant post_ln --output_dir runs/c10-post-ln
    accelerate launch scripts/train_image_classification.py --train_dir imagenette/train \
        --validation_dir imagenette/val --model resnet50.a1_in1k --pretrained --skip_variant rskip_ln ...

The recipe is He et al.'s for pre-activation ResNets ("Identity Mappings in Deep Residual Networks", ECCV 2016):
SGD with momentum 0.9, learning rate 0.1 (0.01 for the first 400 updates of the 110- and 164-layer nets), divided
by 10 at 50% and 75% of training, weight decay 1e-4 (not on norms and biases), batches of 128, random crops of the
image padded by 4 pixels and horizontal flips; ImageNet-sized models get timm's training transform instead. The
output folder ends up a Hub-ready model folder (the best checkpoint by validation top-1 accuracy, with its custom
code, class names and image processor) plus `results.json`; `checkpoints/` holds resumable training states.
"""

import argparse
import contextlib
import math
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.models import split_model_name_tag
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, CosineAnnealingLR, MultiStepLR
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

from rskip import SKIP_VARIANTS, ResNetSkipOptions, RSkipResNetConfig, RSkipResNetForImageClassification
from rskip.timm_resnets import rskip_architecture
from training_common import (
    BEST_MODEL,
    RunState,
    TrainingError,
    add_output_arguments,
    command_line,
    create_accelerator,
    find_checkpoint,
    finish_output,
    init_tracking,
    read_data_file,
    resume,
    run_config,
    run_main,
    run_results,
    save_best_model,
    train_loop,
)

SKIP_FLAGS = tuple(ResNetSkipOptions.__dataclass_fields__)
# The column names tried first when --image_column / --label_column are not given.
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
# He et al. warm the 110-layer net up at a tenth of the rate for 400 updates (and the 164-layer one, in their code).
WARMUP_MODELS = ("preact_resnet110", "preact_resnet164")
DEFAULT_WARMUP_STEPS = 400
# A run may be resumed with other values for these: they do not change the trained weights.
MAY_CHANGE_ON_RESUME = {
    "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "eval_steps",
    "per_device_eval_batch_size", "max_eval_samples", "dataloader_num_workers",
    "with_tracking", "report_to", "push_to_hub", "hub_model_id", "hub_token",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    data = parser.add_argument_group("data (images are converted to RGB)")
    data.add_argument("--dataset_name", help="A Hub dataset (or a local dataset folder) with an image column and a "
                      "class-label column, e.g. uoft-cs/cifar10.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--validation_split_name", default="validation",
                      help="A split of --dataset_name; without it, validation is carved from train "
                           "(--validation_size).")
    data.add_argument("--train_file", help="A parquet file of images and labels, such as a datasets export "
                      "(../shared/data/cifar10/train.parquet).")
    data.add_argument("--validation_file", help="As --train_file.")
    data.add_argument("--train_dir", help="An image folder: one subfolder of images per class (datasets' imagefolder).")
    data.add_argument("--validation_dir", help="As --train_dir.")
    data.add_argument("--validation_size", type=validation_size, default=0.1,
                      help="Without validation data: the last rows of the training data become the validation split, "
                           "a number of images or a fraction (0.1 of CIFAR-10's 50,000 images is its last 5,000).")
    data.add_argument("--image_column", help=f"Default: {' or '.join(IMAGE_COLUMNS)}, else the one Image column.")
    data.add_argument("--label_column", help=f"Default: {' or '.join(LABEL_COLUMNS)}, else the one ClassLabel column.")
    data.add_argument("--num_labels", type=int, help="The number of classes the training data must have (a check).")
    data.add_argument("--max_train_samples", type=int, help="Train on the first N training images.")
    data.add_argument("--max_eval_samples", type=int, help="Validate on the first N validation images.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Processes decoding and augmenting images (e.g. 8 per GPU); 0: the training process.")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="preact_resnet110",
                       help="rskip's CIFAR PreAct-ResNets (preact_resnet20/56/110/164, 32x32 images) or ImageNet "
                            "ResNets (rskip_resnet18/34/50/101/152); timm's resnet18/34/50/101/152 are the latter.")
    model.add_argument("--pretrained", action="store_true",
                       help="Start from timm weights: --model is then a timm name with weights (resnet50.a1_in1k), "
                            "hf-hub:<repo> or a save_for_hf folder; a stock ResNet gets the skip connection (new "
                            "norms start at weight 1, bias 0), and the classifier is new if the classes differ.")
    model.add_argument("--skip_variant", choices=SKIP_VARIANTS,
                       help="Default: rskip_ln, or the one a pretrained rskip model was saved with. "
                            "Setting it resets the other --skip_* options to their defaults.")
    model.add_argument("--skip_scale", type=float, help="λ of the xskip* variants (default 1.0).")
    model.add_argument("--skip_recursions", type=int, help="K of the rskip* variants (default 2).")
    model.add_argument("--skip_share_norm", action=argparse.BooleanOptionalAction, default=None,
                       help="rskip*: one norm for all K steps.")
    model.add_argument("--skip_learnable_scale", action=argparse.BooleanOptionalAction, default=None,
                       help="xskip*: learn λ.")
    model.add_argument("--skip_norm_dims", choices=["chw", "c"],
                       help="LN variants: normalise over (C, H, W) (default) or over C at each position.")

    training = parser.add_argument_group("optimisation")
    training.add_argument("--optimizer", default="momentum", choices=["momentum", "nesterov", "adamw"],
                          help="timm's optimizers: SGD with momentum (He et al.), with Nesterov momentum, or AdamW.")
    training.add_argument("--learning_rate", type=float, default=0.1, help="Peak learning rate.")
    training.add_argument("--momentum", type=float, default=0.9)
    training.add_argument("--weight_decay", type=float, default=1e-4, help="Not applied to biases and norms.")
    training.add_argument("--label_smoothing", type=float, default=0.0)
    training.add_argument("--max_grad_norm", type=float, default=0.0, help="0 turns clipping off.")
    training.add_argument("--per_device_train_batch_size", type=int, default=128)
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--num_train_epochs", type=int, default=164,
                          help="He et al.: 64k updates of 128 images, 164 epochs of CIFAR-10.")
    training.add_argument("--max_train_steps", type=int, help="Optimizer updates; overrides --num_train_epochs.")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                          help="Default: the `accelerate launch` configuration.")
    training.add_argument("--seed", type=int, default=42)

    schedule = parser.add_argument_group("learning-rate schedule (counted in optimizer updates)")
    schedule.add_argument("--lr_scheduler_type", default="step", choices=["step", "cosine"])
    schedule.add_argument("--lr_decay_milestones", type=float, nargs="+", default=[0.5, 0.75],
                          help="step: the fractions of training after which the rate is multiplied by --lr_decay_rate.")
    schedule.add_argument("--lr_decay_rate", type=float, default=0.1)
    schedule.add_argument("--num_warmup_steps", type=int,
                          help=f"First updates at --warmup_factor times the rate. Default: {DEFAULT_WARMUP_STEPS} for "
                               f"{' and '.join(WARMUP_MODELS)} (He et al.), 0 otherwise.")
    schedule.add_argument("--warmup_factor", type=float, default=0.1)

    augmentation = parser.add_argument_group("augmentation")
    augmentation.add_argument("--augmentation", choices=["pad_crop_flip", "timm"],
                              help="pad_crop_flip: He et al.'s CIFAR augmentation (random crops of the image padded by "
                                   "--crop_padding pixels, horizontal flips); timm: timm's training transform (random "
                                   "resized crops, flips, colour jitter). Default: pad_crop_flip for models of at most "
                                   "64x64 pixels, timm otherwise. Validation uses timm's evaluation transform, which "
                                   "the saved image processor repeats.")
    augmentation.add_argument("--crop_padding", type=int, default=4)

    evaluation = parser.add_argument_group("evaluation (top-1 accuracy and loss on the validation images)")
    evaluation.add_argument("--eval_steps", default="epoch", help="Validate every N updates or every 'epoch', "
                                                                  "and at the end.")
    evaluation.add_argument("--per_device_eval_batch_size", type=int, default=256)

    add_output_arguments(parser)

    args = parser.parse_args(argv)
    sources = [flag for flag in ("dataset_name", "train_file", "train_dir") if getattr(args, flag)]
    if len(sources) != 1:
        parser.error("give one of --dataset_name, --train_file (parquet) or --train_dir (image folder)"
                     + (f", not {' and '.join('--' + flag for flag in sources)}" if sources else ""))
    for validation, train in (("validation_file", "train_file"), ("validation_dir", "train_dir")):
        if getattr(args, validation) and not getattr(args, train):
            parser.error(f"--{validation} goes with --{train}")
    for flag in ("checkpointing_steps", "eval_steps"):
        value = getattr(args, flag)
        if value not in (None, "epoch") and not (value.isdigit() and int(value) > 0):
            parser.error(f"argument --{flag}: expected a number of steps or 'epoch', got {value!r}")
    if not all(0 < fraction < 1 for fraction in args.lr_decay_milestones):
        parser.error(f"argument --lr_decay_milestones: fractions of training between 0 and 1, "
                     f"got {args.lr_decay_milestones}")
    if not args.pretrained:
        try:
            rskip_architecture(split_model_name_tag(args.model)[0])
        except ValueError as error:
            parser.error(f"argument --model: {args.model} cannot take a skip connection (--skip_*): {error}")
    try:
        ResNetSkipOptions(**skip_flags(args))
    except ValueError as error:
        flag = next(name for name in SKIP_FLAGS if str(error).startswith(name))
        parser.error(f"argument --{flag}: {error}")
    if args.num_warmup_steps is None:
        args.num_warmup_steps = DEFAULT_WARMUP_STEPS if split_model_name_tag(args.model)[0] in WARMUP_MODELS else 0
    return args


def validation_size(text: str) -> float | int:
    """--validation_size: a fraction in (0, 1) or a whole number of images."""
    value = float(text)
    if 0 < value < 1:
        return value
    if value >= 1 and value.is_integer():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 or a number of images, got {text!r}")


def skip_flags(args) -> dict:
    """The --skip_* options given on the command line."""
    return {name: getattr(args, name) for name in SKIP_FLAGS if getattr(args, name) is not None}


# ---------------------------------------------------------------------------------------------------- data

def load_raw_datasets(args) -> DatasetDict:
    """train and validation splits with an `image` column (datasets `Image`) and a `label` column (`ClassLabel`, the
    training data's classes in both), from the Hub, a parquet file or an image folder."""
    if args.dataset_name:
        try:
            dataset = load_dataset(args.dataset_name, args.dataset_config_name)
        except (OSError, ValueError, ConnectionError) as error:
            raise TrainingError(f"cannot load --dataset_name {args.dataset_name}: {error}") from error
        if "train" not in dataset:
            raise TrainingError(f"{args.dataset_name} has no 'train' split; it has: {', '.join(dataset)}")
        names = {"train": "train", "validation": args.validation_split_name}
        splits = {split: (dataset[name], f"{args.dataset_name}[{name}]") for split, name in names.items()
                  if name in dataset}
    else:
        paths = {"train": args.train_file or args.train_dir, "validation": args.validation_file or args.validation_dir}
        splits = {split: (read_images(path, folder=bool(args.train_dir)), path)
                  for split, path in paths.items() if path}
    train, where = splits["train"]
    train = image_and_label(train, args, where)
    class_names = train.features["label"].names
    if args.num_labels is not None and args.num_labels != len(class_names):
        raise TrainingError(f"--num_labels {args.num_labels}, but {where} has {len(class_names)} classes: "
                            f"{', '.join(class_names)}")
    if "validation" in splits:
        validation, validation_where = splits["validation"]
        validation = with_classes(image_and_label(validation, args, validation_where), class_names,
                                  validation_where, where)
    else:
        train, validation = carve_validation(train, args.validation_size, where)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return DatasetDict(train=train, validation=validation)


def read_images(path: str, folder: bool) -> Dataset:
    """A parquet file, or an image folder whose subfolders name the classes."""
    path = Path(path)
    try:
        return read_data_file("imagefolder" if folder else "parquet", path, folder)
    except TrainingError as error:
        if folder and isinstance(error.__cause__, ValueError):  # datasets finds no image file
            raise TrainingError(f"no images in {path} (expected {path}/<class name>/<image file>)") from error
        raise


def image_and_label(dataset: Dataset, args, where: str) -> Dataset:
    """The dataset's image and label columns, renamed `image` and `label`, as `Image` and `ClassLabel` features
    (labels of another type become classes in sorted order)."""
    columns = {
        "image": find_column(dataset, args.image_column, IMAGE_COLUMNS, Image, "image", where),
        "label": find_column(dataset, args.label_column, LABEL_COLUMNS, ClassLabel, "label", where),
    }
    if columns["image"] == columns["label"]:
        raise TrainingError(f"{where}: {columns['image']!r} cannot be both the image and the label column")
    dataset = dataset.select_columns(list(columns.values()))
    dataset = dataset.rename_columns({column: name for name, column in columns.items() if column != name})
    try:
        if not isinstance(dataset.features["image"], Image):
            dataset = dataset.cast_column("image", Image())
        if not isinstance(dataset.features["label"], ClassLabel):
            dataset = dataset.class_encode_column("label")
    except (ValueError, TypeError, pa.ArrowException) as error:
        raise TrainingError(f"{where}: column {columns['image']!r} must hold images and {columns['label']!r} class "
                            f"labels: {type(error).__name__}: {error}") from error
    return dataset


def find_column(dataset: Dataset, given: str | None, usual: tuple[str, ...], feature_type, kind: str,
                where: str) -> str:
    """The column named by --<kind>_column, else the first of `usual` present, else the one column of `feature_type`."""
    columns = dataset.column_names
    if given:
        if given not in columns:
            raise TrainingError(f"{where} has no column {given!r} (--{kind}_column); "
                                f"its columns are: {', '.join(columns)}")
        return given
    for name in usual:
        if name in columns:
            return name
    typed = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    if len(typed) == 1:
        return typed[0]
    found = (f"several {feature_type.__name__} columns ({', '.join(typed)})" if typed
             else f"no column named {' or '.join(usual)}")
    raise TrainingError(f"{where} has {found}; name the {kind} column with --{kind}_column "
                        f"(its columns are: {', '.join(columns)})")


def with_classes(validation: Dataset, class_names: list[str], where: str, train_where: str) -> Dataset:
    """`validation` with its labels renumbered as the training data's classes."""
    unknown = sorted(set(validation.features["label"].names) - set(class_names))
    if unknown:
        raise TrainingError(f"{where} has classes that {train_where} lacks: {', '.join(unknown)}")
    if validation.features["label"].names == class_names:
        return validation
    return validation.align_labels_with_mapping({name: index for index, name in enumerate(class_names)}, "label")


def carve_validation(train: Dataset, size: float | int, where: str) -> tuple[Dataset, Dataset]:
    """The training data without its last rows, and those rows: a validation split, the same at every run."""
    count = size if isinstance(size, int) else round(size * len(train))
    if not 0 < count < len(train):
        raise TrainingError(f"--validation_size {size} leaves no training or no validation images: {where} has "
                            f"{len(train)} images and no validation split")
    return train.select(range(len(train) - count)), train.select(range(len(train) - count, len(train)))


def build_transforms(timm_model, augmentation: str | None = None, crop_padding: int = 4):
    """The augmentation's name (by default pad_crop_flip for models of at most 64x64 pixels, timm otherwise), and
    the training and evaluation transforms for the model's timm data configuration (input size, interpolation, crop
    percentage, mean and std: CIFAR-10's for the PreAct-ResNets). Evaluation is timm's: resize to size / crop_pct,
    center crop, normalise."""
    data_config = resolve_data_config(model=timm_model)
    augmentation = augmentation or ("pad_crop_flip" if max(data_config["input_size"][1:]) <= 64 else "timm")
    eval_transform = create_transform(**data_config)
    if augmentation == "timm":
        return augmentation, create_transform(**data_config, is_training=True), eval_transform
    _, height, width = data_config["input_size"]
    train_transform = v2.Compose([
        # First to the evaluation size and crop (nothing to do for CIFAR's 32x32 images), then He et al.'s augmentation.
        v2.Resize(math.floor(min(height, width) / data_config["crop_pct"]),
                  interpolation=str_to_interp_mode(data_config["interpolation"])),
        v2.CenterCrop((height, width)),
        v2.RandomCrop((height, width), padding=crop_padding),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data_config["mean"], data_config["std"]),
    ])
    return augmentation, train_transform, eval_transform


def derived_seed(*keys: int) -> int:
    """A seed for the random numbers of one (seed, epoch, ...) combination, unrelated to those of its neighbours."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """torch's and Python's global random generators seeded with `seed` inside the block, and restored after it."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        yield
    random.setstate(python_state)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """`pixel_values` (the image in RGB, transformed) and `labels` of the rows of a `load_raw_datasets` split.

    With `seed`, the random augmentation of row i in epoch e (`set_epoch`) comes from generators seeded by
    (seed, e, i) instead of the process's: the same whatever the number of data-loader workers, and again after a
    resume. Without it, the process's generators are used (data-loader workers are seeded by their loader).
    """

    def __init__(self, images: Dataset, transform, where: str, seed: int | None = None):
        self.images, self.transform, self.where, self.seed, self.epoch = images, transform, where, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        try:
            row = self.images[index]
            image = row["image"].convert("RGB")  # grayscale, palette, RGBA, CMYK...: the models take 3 channels
        except OSError as error:
            raise TrainingError(f"{self.where}: image {index} cannot be read: {error}") from error
        with contextlib.nullcontext() if self.seed is None else seeded(derived_seed(self.seed, self.epoch, index)):
            pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, "labels": row["label"]}


class EpochShuffle(Sampler):
    """The indices 0..size-1 in an order drawn from (seed, epoch): every process, and a resumed run, sees the same
    order in the same epoch (`set_epoch`). Accelerate's SeedableRandomSampler would, but `save_state` pickles it,
    dataset included, into every checkpoint."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self):
        return self.size


# --------------------------------------------------------------------------------------- model and optimizer

def build_model(args, class_names: list[str]) -> RSkipResNetForImageClassification:
    """rskip's network for --model with the --skip_* options and one output per class; with --pretrained, from timm
    weights (`from_timm`: a stock ResNet gets the skip connection, its new norms starting at weight 1, bias 0)."""
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {name: index for index, name in enumerate(class_names)}}
    skip = {**(ResNetSkipOptions().to_dict() if args.skip_variant else {}), **skip_flags(args)}
    try:
        if args.pretrained:
            return RSkipResNetForImageClassification.from_timm(args.model, ignore_mismatched_sizes=True,
                                                               **labels, **skip)
        backbone = rskip_architecture(split_model_name_tag(args.model)[0])
        return RSkipResNetForImageClassification(RSkipResNetConfig(backbone=backbone, **labels, **skip))
    except ValueError as error:
        raise TrainingError(f"--model {args.model}: {error}") from error
    except (OSError, RuntimeError) as error:  # no such weights, or the Hub out of reach
        raise TrainingError(f"cannot load pretrained weights for --model {args.model}: {error}") from error


def create_scheduler(optimizer, args, max_train_steps: int):
    """Step decay at --lr_decay_milestones or cosine annealing over the run, after --num_warmup_steps updates at
    --warmup_factor times the rate (He et al.'s warmup: constant, then the full rate)."""
    if args.lr_scheduler_type == "step":
        milestones = [round(fraction * max_train_steps) for fraction in args.lr_decay_milestones]
        decay = MultiStepLR(optimizer, milestones=milestones, gamma=args.lr_decay_rate)
    else:
        decay = CosineAnnealingLR(optimizer, T_max=max_train_steps)
    if not args.num_warmup_steps:
        return decay
    warmup = ConstantLR(optimizer, factor=args.warmup_factor, total_iters=args.num_warmup_steps)
    return ChainedScheduler([warmup, decay])


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy over the validation images, each counted once."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in tqdm(dataloader, desc="validation", leave=False, disable=not accelerator.is_local_main_process):
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        losses, hits = accelerator.gather_for_metrics((losses, logits.argmax(-1) == batch["labels"]))
        loss_sum, correct, count = loss_sum + losses.sum().item(), correct + hits.sum().item(), count + len(hits)
    model.train(was_training)
    return {"top1": round(100 * correct / count, 2), "loss": round(loss_sum / count, 4), "images": count}


# --------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = create_accelerator(args)
    checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
    state = RunState.from_checkpoint(checkpoint, run_config(args, MAY_CHANGE_ON_RESUME,
                                                            num_processes=accelerator.num_processes))
    set_seed(args.seed)

    # Data and model
    with accelerator.main_process_first():
        raw = load_raw_datasets(args)
    class_names = raw["train"].features["label"].names
    model = build_model(args, class_names)
    augmentation, train_transform, eval_transform = build_transforms(model.timm_model, args.augmentation,
                                                                     args.crop_padding)
    train_data = ImageClassificationDataset(raw["train"], train_transform, "training data", seed=args.seed)
    # Own generators: iterating a loader then draws no number from the global RNG, so evaluations and resumes leave
    # the training trajectory unchanged.
    train_dataloader = DataLoader(train_data, batch_size=args.per_device_train_batch_size,
                                  sampler=EpochShuffle(len(train_data), args.seed),
                                  num_workers=args.dataloader_num_workers,
                                  generator=torch.Generator().manual_seed(args.seed))
    eval_dataloader = DataLoader(ImageClassificationDataset(raw["validation"], eval_transform, "validation data"),
                                 batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                                 generator=torch.Generator().manual_seed(args.seed))

    # Optimizer and schedule: timm's optimizer leaves biases, norms and scales out of weight decay.
    skip = model.config.skip_options().to_dict()
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = create_optimizer_v2(model, opt=args.optimizer, lr=args.learning_rate,
                                    weight_decay=args.weight_decay, momentum=args.momentum)
    updates_per_epoch = math.ceil(math.ceil(len(train_dataloader) / accelerator.num_processes)
                                  / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    lr_scheduler = create_scheduler(optimizer, args, max_train_steps)

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    if args.with_tracking:
        init_tracking(accelerator, "image_classification", vars(args))

    # Resume: weights, optimizer, schedule and RNG from the checkpoint; the data position is in `state`.
    best_dir = output_dir / BEST_MODEL
    if checkpoint:
        resume(accelerator, checkpoint, state, best_dir)

    accelerator.print(
        f"{args.model}: {num_parameters / 1e6:.2f}M parameters, skip connection {skip}\n"
        f"{len(raw['train'])} training and {len(raw['validation'])} validation images, "
        f"{len(class_names)} classes, {augmentation} augmentation; {updates_per_epoch} updates per epoch of "
        f"{args.per_device_train_batch_size} images x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation; {max_train_steps} updates ({num_epochs} epochs), "
        f"{args.num_warmup_steps} warmup updates, mixed precision {accelerator.mixed_precision}"
    )

    def batch_loss(model, batch):  # summed over the images
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=args.label_smoothing, reduction="sum")

    def validate():
        scores = evaluate(model, eval_dataloader, accelerator)
        record = {"step": state.step, "epoch": round(state.step / updates_per_epoch, 2), "top1": scores["top1"],
                  "loss": scores["loss"]}
        state.history.append(record)
        accelerator.log({"validation/top1": scores["top1"], "validation/loss": scores["loss"]}, step=state.step)
        improved = state.best is None or (scores["top1"], -scores["loss"]) > (state.best["top1"], -state.best["loss"])
        accelerator.print(f"epoch {record['epoch']:.2f}, step {state.step}: validation top-1 {scores['top1']:.2f}% "
                          f"loss {scores['loss']:.4f} on {scores['images']} images"
                          + (" (best so far)" if improved else ""))
        if improved:
            state.best = {"step": state.step, **scores}
            save_best_model(accelerator, model, best_dir, state.best)

    # Training
    start_time = time.time()
    train_loop(accelerator, model, optimizer, lr_scheduler, train_dataloader, state, args, max_train_steps,
               batch_loss=batch_loss, count_name="images", validate=validate,
               # The epoch orders the images (the sampler) and seeds their augmentation (the dataset). Accelerate passes
               # it on to the dataset only when it runs a single process: set both.
               on_epoch=train_data.set_epoch)
    runtime = time.time() - start_time

    # The Hub-ready output folder: the best model (custom code, config, image processor), results, curves.
    results = {"model": args.model, "skip": skip,
               **run_results(accelerator, model, state, args, runtime, command_line(__file__, argv))}
    finish_output(accelerator, args, best_dir, results, curves=["loss", "top1"])
    accelerator.print(f"Saved the best model (step {results['best_step']}, top-1 {results['validation']['top1']:.2f}%) "
                      f"and results.json to {output_dir}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_main(main)
