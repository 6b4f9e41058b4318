"""The command lines of the training scripts: their flags, grouped by concern as in timm's `train.py`, checked once
after parsing, so that a bad value stops the run before any work with one message naming the flag.

- `parse_translation_args`, `parse_image_classification_args`: `rskip-train-translation` and
  `rskip-train-image-classification` (`rskip.commands`).
- `add_skip_arguments`: the `--skip_*` flags, made from the declarations of `SkipOptions` (its fields, their
  documentation, types and choices); `check_skip_arguments` maps a `ConfigFieldError` to the flag by its `field`.
- `parse_trainer_args`: a command line split between a transformers `TrainingArguments` class and a script's flags,
  for the Trainer examples.
- `run_main`: a `TrainingError` becomes `error: <message>` and exit status 1, not a traceback; `CommandParser`, the
  commands' parser; `bounded` and the other argparse types check numbers, folders and lists where they are parsed.
"""

import argparse
import dataclasses
import math
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from sacrebleu.metrics import BLEU
from timm.models import split_model_name_tag
from transformers import HfArgumentParser

from ..command_line import (  # noqa: F401  (the number types are this module's too, as the commands import them)
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    SEED,
    VOCAB_SIZE,
    WARMUP_FACTOR,
    CommandParser,
    bounded,
    output_folder,
)
from ..configuration_rskip_marian import RSkipMarianConfig
from ..failure_report import report_failure
from ..skip_options import ConfigFieldError, ResNetSkipOptions, SkipOptions
from ..timm_resnets import rskip_architecture
from .errors import TrainingError
from .hub import HUB_STRATEGIES
from .signals import RunStopped
from .image_classification import DEFAULT_WARMUP_STEPS, IMAGE_COLUMNS, LABEL_COLUMNS, WARMUP_MODELS
from .translation import MODEL_PRESETS

TRANSLATION_DESCRIPTION = (
    "Train a translation Transformer whose residual connections come from the family of Liu et al., \"Rethinking "
    "Skip Connection with Layer Normalization in Transformers and ResNets\" (COLING 2020) -- by default rSkip+LN, "
    "y = LN_2(x + LN_1(x + F(x))) -- with Accelerate: one process, many GPUs or many machines."
)
IMAGE_CLASSIFICATION_DESCRIPTION = TRANSLATION_DESCRIPTION.replace("a translation Transformer", "an image classifier")


def run_main(main: Callable[[], object]) -> None:
    """Call `main()`, turning the ways a run ends early into one line and the conventional exit status instead of a
    traceback: a `TrainingError` prints `error: <message>` and exits with 1 (under `accelerate launch`, where every
    process raises the same error, one process prints it and each hands it to the launcher's summary:
    `rskip.training.failure_report`); a run stopped by a signal exits with 128 + its number (143 for SIGTERM, 130
    for SIGINT); a second Ctrl-C exits with 130."""
    try:
        main()
    except TrainingError as error:
        report_failure(f"error: {error}")
        sys.exit(1)
    except RunStopped as stop:
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:
        print("Interrupted: stopped at once, without saving a checkpoint", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


# Flags whose values are secrets: never written to results, cards, trackers or logs.
SECRET_FLAGS = ("--hub_token",)
REDACTED = "<redacted>"


def command_line(command: str, argv: list[str] | None) -> str:
    """The command that ran `main(argv)`, for results.json and model cards, with secrets redacted: the installed
    command (`rskip-train-translation`, however it was started: console script, `python -m` or `accelerate launch
    -m`) followed by its arguments (`sys.argv[1:]` when `argv` is None), so that anyone with the package can rerun it."""
    words = [command, *(sys.argv[1:] if argv is None else argv)]
    for index, word in enumerate(words):
        for flag in SECRET_FLAGS:
            if word == flag and index + 1 < len(words):
                words[index + 1] = REDACTED
            elif word.startswith(flag + "="):
                words[index] = f"{flag}={REDACTED}"
    return shlex.join(words)


def finished_run(text: str) -> Path:
    """A finished training run's --output_dir: a folder holding results.json."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a finished training run's output folder (no such folder)")
    if not (path / "results.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a finished training run's output folder (it has no "
                                         "results.json)")
    return path


def hub_repo_id(text: str) -> str:
    """A Hub repository id, `name` or `user/name`, as huggingface_hub checks it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repository id (user/name): {error}") from None
    return text


def steps_or_epoch(text: str) -> int | str:
    """--eval_steps, --checkpointing_steps: a number of optimizer updates > 0, or 'epoch'."""
    if text == "epoch":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a number of steps or 'epoch', got {text!r}")


def step_list(text: str) -> tuple[int, ...]:
    """--diagnostics_steps: comma-separated numbers of updates >= 0."""
    steps = text.split(",")
    if not all(step.strip().isdigit() for step in steps):
        raise argparse.ArgumentTypeError(f"expected numbers of updates >= 0 separated by commas, got {text!r}")
    return tuple(sorted({int(step) for step in steps}))


def add_skip_arguments(parser: argparse.ArgumentParser, options_class: type[SkipOptions], default: str) -> None:
    """A `--<field>` flag for every field of `options_class`, left None unless given. `default` says which variant
    a run gets without `--skip_variant`."""
    group = parser.add_argument_group("skip connection (Liu et al., COLING 2020)")
    for spec in dataclasses.fields(options_class):
        help_text = spec.metadata["help"].replace("%", "%%")
        if spec.name == "skip_variant":
            group.add_argument("--skip_variant", choices=spec.metadata["choices"],
                               help=f"{help_text} Default: {default}. Setting it resets the other --skip_* options "
                                    "to their defaults.")
        elif spec.type is bool:
            group.add_argument(f"--{spec.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} (default {spec.default})")
        else:
            group.add_argument(f"--{spec.name}", type=None if spec.metadata["choices"] else spec.type,
                               choices=spec.metadata["choices"], help=f"{help_text} (default {spec.default!r})")


def check_skip_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         options_class: type[SkipOptions]) -> None:
    """Exit with argparse's usage error if the given `--skip_*` flags make no valid `options_class`."""
    try:
        options_class(**options_class.given(args))
    except ConfigFieldError as error:
        parser.error(f"argument --{error.field}: {error}")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a script's last two groups: checkpoints and output, logging and the Hub."""
    output = parser.add_argument_group("checkpoints and output")
    output.add_argument("--output_dir", type=output_folder, required=True)
    output.add_argument("--checkpointing_steps", type=steps_or_epoch,
                        help="Save a resumable state every N updates, or 'epoch'; and at the end of training.")
    output.add_argument("--checkpoints_total_limit", type=COUNT, help="Keep only the newest N checkpoints.")
    output.add_argument("--resume_from_checkpoint",
                        help="A checkpoint folder; 'latest' (the newest intact checkpoint of this run in "
                             "--output_dir, if any); or 'hub' ('hub@<revision>'): last-checkpoint/ of --hub_model_id "
                             "on the Hub.")
    output.add_argument("--overwrite_output_dir", action="store_true",
                        help="Start a new run in an --output_dir that holds another one, deleting that run's files.")

    logging = parser.add_argument_group("logging and the Hub")
    logging.add_argument("--diagnostics_steps", type=step_list, default=(),
                         help="Measure per-sublayer gradient norms and the output change under one Adam step after "
                              "these updates (0: at initialisation), e.g. 0,100,1000: diagnostics.json and "
                              "diagnostics.png in --output_dir (rskip.diagnostics).")
    logging.add_argument("--with_tracking", action="store_true")
    logging.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "trackio", "wandb", "all"])
    logging.add_argument("--push_to_hub", action="store_true")
    logging.add_argument("--hub_model_id", help="Defaults to the name of --output_dir.")
    logging.add_argument("--hub_token", help="Default: HF_TOKEN or the token of `hf auth login` (better than this "
                                             "flag). Never written to results, model cards or trackers.")
    logging.add_argument("--hub_strategy", default="end", choices=HUB_STRATEGIES,
                         help="What --push_to_hub uploads besides the output folder at the end: every_save, the best "
                              "model with its card and results at each checkpoint (in the background); checkpoint, "
                              "also the training state in last-checkpoint/ (see --resume_from_checkpoint hub); "
                              "all_checkpoints, also each checkpoint in checkpoints/step_<N>/.")


def max_steps(text: str) -> int:
    """TrainingArguments.max_steps: a number of updates >= 1, or -1 (train for --num_train_epochs)."""
    value = bounded(int, -1)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, or -1 (train for --num_train_epochs), "
                                         f"got {text!r}")
    return value


# The range of every number of transformers' (Seq2Seq)TrainingArguments, which takes any number its type allows.
TRAINER_NUMBERS = {
    "per_device_train_batch_size": COUNT, "per_device_eval_batch_size": COUNT, "gradient_accumulation_steps": COUNT,
    "eval_accumulation_steps": COUNT, "num_train_epochs": POSITIVE, "max_steps": max_steps,
    "learning_rate": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "adam_beta1": FRACTION, "adam_beta2": FRACTION, "adam_epsilon": POSITIVE, "max_grad_norm": NON_NEGATIVE,
    "label_smoothing_factor": FRACTION, "neftune_noise_alpha": POSITIVE, "torch_empty_cache_steps": COUNT,
    "logging_steps": POSITIVE, "eval_steps": POSITIVE, "eval_delay": NON_NEGATIVE, "save_steps": POSITIVE,
    "save_total_limit": COUNT, "seed": SEED, "data_seed": SEED, "dataloader_num_workers": NON_NEGATIVE_INT,
    "dataloader_prefetch_factor": COUNT, "ddp_bucket_cap_mb": COUNT, "ddp_timeout": COUNT,
    "local_rank": bounded(int, -1), "generation_max_length": COUNT, "generation_num_beams": COUNT,
}


class TrainerArgumentParser(HfArgumentParser):
    """transformers' parser of a TrainingArguments class, with the numbers' ranges (`TRAINER_NUMBERS`) checked
    where they are parsed and its errors reported as `CommandParser`'s."""

    error = CommandParser.error

    def __init__(self, arguments_class):
        super().__init__(arguments_class)
        for action in self._actions:
            if action.dest in TRAINER_NUMBERS:
                action.type = TRAINER_NUMBERS[action.dest]


def parse_trainer_args(arguments_class, parse_args: Callable, argv: list[str] | None = None) -> tuple:
    """Split a command line (`sys.argv[1:]` when `argv` is None) between a transformers `TrainingArguments` class,
    which takes its fields, and a training script's `parse_args`, which takes the rest plus the Trainer's
    --output_dir and --seed. Returns both parsed; a bad value of either exits with argparse's usage error."""
    parser = TrainerArgumentParser(arguments_class)
    try:
        training_args, rest = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv,
                                                                 return_remaining_strings=True)
    except ValueError as error:  # TrainingArguments' own checks of how its fields go together
        parser.error(str(error))
    args = parse_args([*rest, "--output_dir", training_args.output_dir, "--seed", str(training_args.seed)])
    return training_args, args


def parse_translation_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `rskip-train-translation` (`sys.argv[1:]` when `argv` is None), checked."""
    parser = CommandParser(description=TRANSLATION_DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A Hub dataset (or a local dataset folder), with a 'translation' "
                      "column of {lang: text} pairs or one column per language.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_file", help="JSON lines in the HF translation format ({'translation': {'en': ..., "
                      "'de': ...}}), or the prefix of parallel text files PREFIX.<lang>[.gz], one sentence a line.")
    data.add_argument("--validation_file", help="As --train_file.")
    data.add_argument("--test_file", help="As --train_file; evaluated once at the end, with the best model.")
    data.add_argument("--validation_split_name", default="validation")
    data.add_argument("--test_split_name", default="test")
    data.add_argument("--source_lang", required=True)
    data.add_argument("--target_lang", required=True)
    data.add_argument("--max_source_length", type=COUNT, default=256, help="Longer sources are truncated.")
    data.add_argument("--max_target_length", type=COUNT, default=256, help="Longer targets are truncated.")
    data.add_argument("--max_train_samples", type=COUNT)
    data.add_argument("--max_eval_samples", type=COUNT)
    data.add_argument("--max_predict_samples", type=COUNT)
    data.add_argument("--drop_empty_pairs", action="store_true",
                      help="Drop pairs with an empty side instead of stopping with an error.")
    data.add_argument("--preprocessing_num_workers", type=COUNT)

    tokenizer = parser.add_argument_group("tokenizer (trained on the training data when none is given)")
    tokenizer.add_argument("--tokenizer_name", help="Defaults to --model_name_or_path.")
    tokenizer.add_argument("--vocab_size", type=VOCAB_SIZE, default=8000)
    vocab = tokenizer.add_mutually_exclusive_group()
    vocab.add_argument("--joint_vocab", dest="joint_vocab", action="store_true", default=True,
                       help="One SentencePiece model for both languages (Vaswani et al.).")
    vocab.add_argument("--separate_vocab", dest="joint_vocab", action="store_false",
                       help="One SentencePiece model per language (OPUS-MT); the vocabulary is still shared.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_preset", choices=sorted(MODEL_PRESETS), help="Train from scratch.")
    model.add_argument("--model_name_or_path", help="Start from a Marian or RSkipMarian checkpoint.")
    model.add_argument("--config_overrides", help="Config fields to change, e.g. 'encoder_layers=6,dropout=0.3'.")
    add_skip_arguments(parser, SkipOptions, default="rskip_ln from scratch, the checkpoint's own with "
                                                     "--model_name_or_path")

    training = parser.add_argument_group("optimisation")
    training.add_argument("--learning_rate", type=NON_NEGATIVE, default=5e-4, help="Peak learning rate.")
    training.add_argument("--adam_beta1", type=FRACTION, default=0.9)
    training.add_argument("--adam_beta2", type=FRACTION, default=0.98)
    training.add_argument("--adam_epsilon", type=POSITIVE, default=1e-9)
    training.add_argument("--weight_decay", type=NON_NEGATIVE, default=0.0, help="Not applied to biases and norms.")
    training.add_argument("--lr_scheduler_type", default="inverse_sqrt",
                          choices=["inverse_sqrt", "linear", "cosine", "constant_with_warmup"])
    training.add_argument("--num_warmup_steps", type=NON_NEGATIVE_INT, default=4000)
    training.add_argument("--label_smoothing", type=FRACTION, default=0.1)
    training.add_argument("--max_grad_norm", type=NON_NEGATIVE, default=1.0, help="0 turns clipping off.")
    batching = training.add_mutually_exclusive_group()
    batching.add_argument("--max_tokens", type=COUNT,
                          help="Token-based batches of similar lengths: at most this many padded tokens per "
                               "device and micro-batch (the default, 4096, when neither option is given).")
    batching.add_argument("--per_device_train_batch_size", type=COUNT, help="Sentence-based random batches.")
    training.add_argument("--gradient_accumulation_steps", type=COUNT, default=1)
    training.add_argument("--num_train_epochs", type=COUNT, default=10)
    training.add_argument("--max_train_steps", type=COUNT, help="Optimizer updates; overrides --num_train_epochs.")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                          help="Default: the `accelerate launch` configuration.")
    training.add_argument("--seed", type=SEED, default=42)

    evaluation = parser.add_argument_group("evaluation (beam search, sacreBLEU and chrF)")
    evaluation.add_argument("--eval_steps", type=steps_or_epoch, default=1000,
                            help="Validate every N updates or every 'epoch', and at the end.")
    evaluation.add_argument("--per_device_eval_batch_size", type=COUNT, default=64)
    evaluation.add_argument("--num_beams", type=COUNT, default=4)
    evaluation.add_argument("--val_max_target_length", type=COUNT,
                            help="Most tokens generated per sentence; defaults to --max_target_length.")
    evaluation.add_argument("--bleu_tokenize", default="13a", choices=list(BLEU.TOKENIZERS),
                            help="sacreBLEU's tokenizer: 13a (its default), intl, char (for one-word outputs), zh...")

    add_output_arguments(parser)

    args = parser.parse_args(argv)
    if not (args.dataset_name or args.train_file):
        parser.error("give --dataset_name, or --train_file and --validation_file")
    if args.train_file and not args.validation_file:
        parser.error("--train_file needs --validation_file (validation picks the best checkpoint)")
    if args.dataset_name and args.train_file:
        parser.error("give either --dataset_name or --train_file, not both")
    if not (args.model_preset or args.model_name_or_path):
        parser.error(f"give --model_preset ({', '.join(MODEL_PRESETS)}) or --model_name_or_path")
    if args.model_preset and args.model_name_or_path:
        parser.error("give either --model_preset (from scratch) or --model_name_or_path (fine-tuning), not both")
    if args.max_tokens is None and args.per_device_train_batch_size is None:
        args.max_tokens = 4096
    args.val_max_target_length = args.val_max_target_length or args.max_target_length
    check_skip_arguments(parser, args, SkipOptions)
    if args.config_overrides:
        check_config_overrides(parser, args)
    return args


def check_config_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--config_overrides: `field=value` pairs of the config the run builds (a preset's: its shapes are checked
    too; a checkpoint's is read later, so here only the fields and their types are)."""
    try:
        config = RSkipMarianConfig(**(MODEL_PRESETS[args.model_preset] if args.model_preset else {}),
                                   **SkipOptions.given(args))
        config.update_from_string(args.config_overrides)
        config.skip_options()
        if args.model_preset:
            config.check_shapes()
    except ValueError as error:
        parser.error(f"argument --config_overrides: {args.config_overrides!r}: {error}; expected field=value pairs "
                     "of RSkipMarianConfig separated by commas")


def parse_image_classification_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `rskip-train-image-classification` (`sys.argv[1:]` when `argv` is None), checked."""
    parser = CommandParser(description=IMAGE_CLASSIFICATION_DESCRIPTION,
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
    data.add_argument("--num_labels", type=COUNT, help="The number of classes the training data must have (a check).")
    data.add_argument("--max_train_samples", type=COUNT, help="Train on the first N training images.")
    data.add_argument("--max_eval_samples", type=COUNT, help="Validate on the first N validation images.")
    data.add_argument("--dataloader_num_workers", type=NON_NEGATIVE_INT, default=0,
                      help="Processes decoding and augmenting images (e.g. 8 per GPU); 0: the training process.")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="preact_resnet110",
                       help="rskip's CIFAR PreAct-ResNets (preact_resnet20/56/110/164, 32x32 images) or ImageNet "
                            "ResNets (rskip_resnet18/34/50/101/152); timm's resnet18/34/50/101/152 are the latter.")
    model.add_argument("--pretrained", action="store_true",
                       help="Start from timm weights: --model is then a timm name with weights (resnet50.a1_in1k), "
                            "hf-hub:<repo> or a save_for_hf folder; a stock ResNet gets the skip connection (new "
                            "norms start at weight 1, bias 0), and the classifier is new if the classes differ.")
    add_skip_arguments(parser, ResNetSkipOptions, default="rskip_ln, or the one a pretrained rskip model was saved with")

    training = parser.add_argument_group("optimisation")
    training.add_argument("--optimizer", default="momentum", choices=["momentum", "nesterov", "adamw"],
                          help="timm's optimizers: SGD with momentum (He et al.), with Nesterov momentum, or AdamW.")
    training.add_argument("--learning_rate", type=NON_NEGATIVE, default=0.1, help="Peak learning rate.")
    training.add_argument("--momentum", type=FRACTION, default=0.9)
    training.add_argument("--weight_decay", type=NON_NEGATIVE, default=1e-4, help="Not applied to biases and norms.")
    training.add_argument("--label_smoothing", type=FRACTION, default=0.0)
    training.add_argument("--max_grad_norm", type=NON_NEGATIVE, default=0.0, help="0 turns clipping off.")
    training.add_argument("--per_device_train_batch_size", type=COUNT, default=128)
    training.add_argument("--gradient_accumulation_steps", type=COUNT, default=1)
    training.add_argument("--num_train_epochs", type=COUNT, default=164,
                          help="He et al.: 64k updates of 128 images, 164 epochs of CIFAR-10.")
    training.add_argument("--max_train_steps", type=COUNT, help="Optimizer updates; overrides --num_train_epochs.")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                          help="Default: the `accelerate launch` configuration.")
    training.add_argument("--seed", type=SEED, default=42)

    schedule = parser.add_argument_group("learning-rate schedule (counted in optimizer updates)")
    schedule.add_argument("--lr_scheduler_type", default="step", choices=["step", "cosine"])
    schedule.add_argument("--lr_decay_milestones", type=bounded(float, 0, 1, low_open=True, high_open=True), nargs="+",
                          default=[0.5, 0.75],
                          help="step: the fractions of training after which the rate is multiplied by --lr_decay_rate.")
    schedule.add_argument("--lr_decay_rate", type=POSITIVE, default=0.1)
    schedule.add_argument("--num_warmup_steps", type=NON_NEGATIVE_INT,
                          help=f"First updates at --warmup_factor times the rate. Default: {DEFAULT_WARMUP_STEPS} for "
                               f"{' and '.join(WARMUP_MODELS)} (He et al.), 0 otherwise.")
    schedule.add_argument("--warmup_factor", type=WARMUP_FACTOR, default=0.1)

    augmentation = parser.add_argument_group("augmentation")
    augmentation.add_argument("--augmentation", choices=["pad_crop_flip", "timm"],
                              help="pad_crop_flip: He et al.'s CIFAR augmentation (random crops of the image padded by "
                                   "--crop_padding pixels, horizontal flips); timm: timm's training transform (random "
                                   "resized crops, flips, colour jitter). Default: pad_crop_flip for models of at most "
                                   "64x64 pixels, timm otherwise. Validation uses timm's evaluation transform, which "
                                   "the saved image processor repeats.")
    augmentation.add_argument("--crop_padding", type=NON_NEGATIVE_INT, default=4)

    evaluation = parser.add_argument_group("evaluation (top-1 accuracy and loss on the validation images)")
    evaluation.add_argument("--eval_steps", type=steps_or_epoch, default="epoch",
                            help="Validate every N updates or every 'epoch', and at the end.")
    evaluation.add_argument("--per_device_eval_batch_size", type=COUNT, default=256)

    add_output_arguments(parser)

    args = parser.parse_args(argv)
    sources = [flag for flag in ("dataset_name", "train_file", "train_dir") if getattr(args, flag)]
    if len(sources) != 1:
        parser.error("give one of --dataset_name, --train_file (parquet) or --train_dir (image folder)"
                     + (f", not {' and '.join('--' + flag for flag in sources)}" if sources else ""))
    for validation, train in (("validation_file", "train_file"), ("validation_dir", "train_dir")):
        if getattr(args, validation) and not getattr(args, train):
            parser.error(f"--{validation} goes with --{train}")
    if not args.pretrained:
        try:
            rskip_architecture(split_model_name_tag(args.model)[0])
        except ValueError as error:
            parser.error(f"argument --model: {args.model} cannot take a skip connection (--skip_*): {error}")
    check_skip_arguments(parser, args, ResNetSkipOptions)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = DEFAULT_WARMUP_STEPS if split_model_name_tag(args.model)[0] in WARMUP_MODELS else 0
    return args



def validation_size(text: str) -> float | int:
    """--validation_size: a fraction in (0, 1) or a whole number of images."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value < 1:
        return value
    if value >= 1 and value.is_integer():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 or a number of images, got {text!r}")


__all__ = [
    "run_main",
    "CommandParser",
    "bounded",
    "command_line",
    "steps_or_epoch",
    "add_skip_arguments",
    "check_skip_arguments",
    "add_output_arguments",
    "parse_trainer_args",
    "TRAINER_NUMBERS",
    "parse_translation_args",
    "parse_image_classification_args",
    "validation_size",
]
