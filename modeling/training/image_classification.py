"""Image classification: the data pipeline, augmentation, samplers, model building and evaluation of rskip's timm
ResNets, and `ImageClassificationTask`, the parts `rskip.training.train` needs.

    from rskip.training import TrainingConfig, train
    from rskip.training.image_classification import ImageClassificationDataset, EpochShuffle, build_model

The recipe is He et al.'s for pre-activation ResNets ("Identity Mappings in Deep Residual Networks", ECCV 2016):
SGD with momentum 0.9, learning rate 0.1 (0.01 for the first 400 updates of the 110- and 164-layer nets), divided
by 10 at 50% and 75% of training, weight decay 1e-4 (not on norms and biases), batches of 128, random crops of the
image padded by 4 pixels and horizontal flips; ImageNet-sized models get timm's training transform instead. Data
comes from the Hub, a parquet file or an image folder (one subfolder per class). Settings are read from `args`, a
parsed command line (`rskip.training.cli`).
"""

import contextlib
import io
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from accelerate import Accelerator
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.models import split_model_name_tag
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, CosineAnnealingLR, MultiStepLR
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..configuration_rskip_resnet import RSkipResNetConfig
from ..modeling_rskip_resnet import RSkipResNetForImageClassification
from ..skip_options import ResNetSkipOptions
from ..timm_resnets import rskip_architecture
from .data import read_data_file
from .errors import TrainingError, main_process_first
from .loop import TrainingTask

# The column names tried first when --image_column / --label_column are not given.
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
# He et al. warm the 110-layer net up at a tenth of the rate for 400 updates (and the 164-layer one, in their code).
WARMUP_MODELS = ("preact_resnet110", "preact_resnet164")
DEFAULT_WARMUP_STEPS = 400
# A run may be resumed with other values for these: they do not change the trained weights.
MAY_CHANGE_ON_RESUME = frozenset({"per_device_eval_batch_size", "max_eval_samples", "dataloader_num_workers"})



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
    # Before any training: every validation image decodes, every training image has a readable header.
    check_images(validation, "validation data", decode=True)
    check_images(train, "training data", decode=False)
    return DatasetDict(train=train, validation=validation)


def check_images(images: Dataset, where: str, decode: bool) -> None:
    """Every image of `images` can be read: all of it with `decode` (cheap for a validation split), else its header.
    The first that cannot raises `TrainingError` naming its file, or its row when it has none."""
    if not len(images):
        raise TrainingError(f"{where} has no images")
    encoded = images.cast_column("image", Image(decode=False))
    for start in range(0, len(encoded), 1024):
        for offset, item in enumerate(encoded[start:start + 1024]["image"]):
            try:
                with PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                    if decode:
                        image.load()
            except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
                raise TrainingError(f"{where}: {describe_row(item, start + offset)} is not a readable image "
                                    f"({describe_image_error(error)})") from error


def describe_row(item: dict, index: int) -> str:
    return f"{item['path']} (row {index})" if item.get("path") else f"row {index}"


def describe_image_error(error: Exception) -> str:
    """PIL's message without the in-memory file object it names (`<_io.BytesIO object at 0x...>`)."""
    if isinstance(error, PIL.UnidentifiedImageError):
        return "PIL cannot identify its format"
    return f"{type(error).__name__}: {error}"


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
            raise TrainingError(f"{self.where}: row {index} is not a readable image "
                                f"({describe_image_error(error)})") from error
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
    skip = {**(ResNetSkipOptions().to_dict() if args.skip_variant else {}), **ResNetSkipOptions.given(args)}
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


def describe(scores: dict) -> str:
    return f"top-1 {scores['top1']:.2f}% loss {scores['loss']:.4f} on {scores['images']} images"


class ImageClassificationTask(TrainingTask):
    """rskip's timm ResNets on labelled images for `rskip.training.train`: the best model has the highest validation
    top-1 accuracy (then the lowest loss)."""

    name = "image_classification"
    count_name = "images"
    history_metrics = ("loss", "top1")
    may_change_on_resume = MAY_CHANGE_ON_RESUME

    @property
    def batch_description(self) -> str:
        return f"{self.args.per_device_train_batch_size} images"

    def load_data(self, accelerator, checkpoint):
        self.raw = main_process_first(accelerator, lambda: load_raw_datasets(self.args))
        self.class_names = self.raw["train"].features["label"].names

    def build_model(self):
        model = build_model(self.args, self.class_names)
        self.skip_options = model.config.skip_options()
        return model

    def create_dataloaders(self, model, accelerator):
        args = self.args
        self.augmentation, train_transform, eval_transform = build_transforms(model.timm_model, args.augmentation,
                                                                              args.crop_padding)
        self.train_data = ImageClassificationDataset(self.raw["train"], train_transform, "training data",
                                                     seed=args.seed)
        # Own generators: iterating a loader then draws no number from the global RNG, so evaluations and resumes
        # leave the training trajectory unchanged.
        train_dataloader = DataLoader(self.train_data, batch_size=args.per_device_train_batch_size,
                                      sampler=EpochShuffle(len(self.train_data), args.seed),
                                      num_workers=args.dataloader_num_workers,
                                      generator=torch.Generator().manual_seed(args.seed))
        eval_dataloader = DataLoader(
            ImageClassificationDataset(self.raw["validation"], eval_transform, "validation data"),
            batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed))
        return train_dataloader, {"validation": eval_dataloader}

    def create_optimizer(self, model):
        # timm's optimizer leaves biases, norms and scales out of weight decay.
        return create_optimizer_v2(model, opt=self.args.optimizer, lr=self.args.learning_rate,
                                   weight_decay=self.args.weight_decay, momentum=self.args.momentum)

    def create_scheduler(self, optimizer, max_train_steps):
        return create_scheduler(optimizer, self.args, max_train_steps)

    def summary(self, model) -> str:
        parameters = sum(p.numel() for p in model.parameters())
        return (f"{self.args.model}: {parameters / 1e6:.2f}M parameters, skip connection {self.skip_options.used()}\n"
                f"{len(self.raw['train'])} training and {len(self.raw['validation'])} validation images, "
                f"{len(self.class_names)} classes, {self.augmentation} augmentation")

    def set_epoch(self, epoch):
        # The epoch seeds the augmentation; Accelerate passes it on to the dataset only with a single process.
        self.train_data.set_epoch(epoch)

    def batch_loss(self, model, batch):
        """Cross-entropy, summed over the images."""
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.args.label_smoothing,
                               reduction="sum")

    def evaluate(self, model, dataloader, accelerator, split):
        return evaluate(model, dataloader, accelerator), {}

    def is_better(self, scores, best):
        return (scores["top1"], -scores["loss"]) > (best["top1"], -best["loss"])

    describe_scores = staticmethod(describe)

    def run_description(self):
        return {"model": self.args.model, **super().run_description()}

    def finish(self, accelerator, best_dir, eval_dataloaders, output_dir):
        return {}


__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "WARMUP_MODELS",
    "DEFAULT_WARMUP_STEPS",
    "load_raw_datasets",
    "read_images",
    "image_and_label",
    "carve_validation",
    "build_transforms",
    "ImageClassificationDataset",
    "EpochShuffle",
    "build_model",
    "create_scheduler",
    "evaluate",
    "ImageClassificationTask",
]
