"""Train a translation Transformer whose residual connections come from the family of Liu et al., "Rethinking
Skip Connection with Layer Normalization in Transformers and ResNets" (COLING 2020) -- by default rSkip+LN,
y = LN_2(x + LN_1(x + F(x))) -- with Accelerate: one process, many GPUs or many machines.

    # from scratch, on a Hub dataset or on local files
    accelerate launch scripts/train_translation.py --dataset_name bentrevett/multi30k \
        --source_lang en --target_lang de --model_preset transformer-small \
        --skip_variant rskip_ln --skip_recursions 2 --output_dir runs/m30k-rskip
    python scripts/train_translation.py --train_file ../shared/data/multi30k/train \
        --validation_file ../shared/data/multi30k/val --source_lang en --target_lang de ...
    # fine-tune a stock Marian checkpoint patched with rSkip+LN
    accelerate launch scripts/train_translation.py --model_name_or_path Helsinki-NLP/opus-mt-en-de \
        --skip_variant rskip_ln --skip_recursions 2 ...

The recipe is Vaswani et al.'s: Adam (β2 = 0.98), inverse-square-root schedule with warmup, label smoothing,
length-grouped batches of `--max_tokens` tokens, the loss averaged over the target tokens of each update
(whatever the gradient accumulation and the number of processes), beam search, sacreBLEU. The output folder
ends up a Hub-ready model folder (the best checkpoint by validation BLEU, with its tokenizer, custom code and
generation config) plus `results.json`; `checkpoints/` holds resumable training states.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed
from datasets import Dataset, DatasetDict, load_dataset
from sacrebleu.metrics import BLEU, CHRF
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, get_scheduler

from rskip import SKIP_VARIANTS, RSkipMarianConfig, RSkipMarianMTModel, SkipOptions
from rskip.tokenization import train_marian_tokenizer
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

# Marian-architecture Transformers: ReLU, scaled and shared embeddings, sinusoidal positions, post-LN sublayers
# (each joined by the chosen skip connection), dropout on sublayer outputs only.
TRANSFORMER = dict(activation_function="relu", scale_embedding=True, share_encoder_decoder_embeddings=True,
                   tie_word_embeddings=True, attention_dropout=0.0, activation_dropout=0.0)


def _transformer(d_model, layers, heads, ffn_dim, dropout):
    return dict(TRANSFORMER, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                encoder_attention_heads=heads, decoder_attention_heads=heads,
                encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, dropout=dropout)


MODEL_PRESETS = {
    "transformer-tiny": _transformer(64, 2, 4, 128, 0.1),  # tests and demos: seconds on a CPU
    "transformer-small": _transformer(256, 3, 4, 1024, 0.1),  # CPU scale: Multi30k in about 30 minutes
    "transformer-iwslt": _transformer(512, 6, 4, 1024, 0.3),  # fairseq's transformer_iwslt_de_en and its recipe
    "transformer-base": _transformer(512, 6, 8, 2048, 0.1),  # Vaswani et al. (2017), Table 3
    "transformer-big": _transformer(1024, 6, 16, 4096, 0.3),  # Vaswani et al. (2017), Table 3 (EN-DE dropout)
}
SKIP_FLAGS = tuple(SkipOptions.__dataclass_fields__)
# A run may be resumed with other values for these: they do not change the trained weights, except the training
# length (with the default inverse_sqrt schedule, a longer run passes through the same weights).
MAY_CHANGE_ON_RESUME = {
    "max_train_steps", "num_train_epochs",
    "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "eval_steps",
    "per_device_eval_batch_size", "num_beams", "val_max_target_length", "bleu_tokenize", "max_eval_samples",
    "max_predict_samples",
    "with_tracking", "report_to", "push_to_hub", "hub_model_id", "hub_token", "preprocessing_num_workers",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    data.add_argument("--max_source_length", type=int, default=256, help="Longer sources are truncated.")
    data.add_argument("--max_target_length", type=int, default=256, help="Longer targets are truncated.")
    data.add_argument("--max_train_samples", type=int)
    data.add_argument("--max_eval_samples", type=int)
    data.add_argument("--max_predict_samples", type=int)
    data.add_argument("--drop_empty_pairs", action="store_true",
                      help="Drop pairs with an empty side instead of stopping with an error.")
    data.add_argument("--preprocessing_num_workers", type=int)

    tokenizer = parser.add_argument_group("tokenizer (trained on the training data when none is given)")
    tokenizer.add_argument("--tokenizer_name", help="Defaults to --model_name_or_path.")
    tokenizer.add_argument("--vocab_size", type=int, default=8000)
    vocab = tokenizer.add_mutually_exclusive_group()
    vocab.add_argument("--joint_vocab", dest="joint_vocab", action="store_true", default=True,
                       help="One SentencePiece model for both languages (Vaswani et al.).")
    vocab.add_argument("--separate_vocab", dest="joint_vocab", action="store_false",
                       help="One SentencePiece model per language (OPUS-MT); the vocabulary is still shared.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_preset", choices=sorted(MODEL_PRESETS), help="Train from scratch.")
    model.add_argument("--model_name_or_path", help="Start from a Marian or RSkipMarian checkpoint.")
    model.add_argument("--config_overrides", help="Config fields to change, e.g. 'encoder_layers=6,dropout=0.3'.")
    model.add_argument("--skip_variant", choices=SKIP_VARIANTS,
                       help="Default: rskip_ln from scratch, the checkpoint's own with --model_name_or_path. "
                            "Setting it resets the other --skip_* options to their defaults.")
    model.add_argument("--skip_scale", type=float, help="λ of the xskip* variants (default 1.0).")
    model.add_argument("--skip_recursions", type=int, help="K of the rskip* variants (default 2).")
    model.add_argument("--skip_share_norm", action=argparse.BooleanOptionalAction, default=None,
                       help="rskip*: one norm for all K steps.")
    model.add_argument("--skip_learnable_scale", action=argparse.BooleanOptionalAction, default=None,
                       help="xskip*: learn λ.")

    training = parser.add_argument_group("optimisation")
    training.add_argument("--learning_rate", type=float, default=5e-4, help="Peak learning rate.")
    training.add_argument("--adam_beta1", type=float, default=0.9)
    training.add_argument("--adam_beta2", type=float, default=0.98)
    training.add_argument("--adam_epsilon", type=float, default=1e-9)
    training.add_argument("--weight_decay", type=float, default=0.0, help="Not applied to biases and norms.")
    training.add_argument("--lr_scheduler_type", default="inverse_sqrt",
                          choices=["inverse_sqrt", "linear", "cosine", "constant_with_warmup"])
    training.add_argument("--num_warmup_steps", type=int, default=4000)
    training.add_argument("--label_smoothing", type=float, default=0.1)
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off.")
    batching = training.add_mutually_exclusive_group()
    batching.add_argument("--max_tokens", type=int,
                          help="Token-based batches of similar lengths: at most this many padded tokens per "
                               "device and micro-batch (the default, 4096, when neither option is given).")
    batching.add_argument("--per_device_train_batch_size", type=int, help="Sentence-based random batches.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--num_train_epochs", type=int, default=10)
    training.add_argument("--max_train_steps", type=int, help="Optimizer updates; overrides --num_train_epochs.")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                          help="Default: the `accelerate launch` configuration.")
    training.add_argument("--seed", type=int, default=42)

    evaluation = parser.add_argument_group("evaluation (beam search, sacreBLEU and chrF)")
    evaluation.add_argument("--eval_steps", type=int, default=1000, help="Validate every N updates, and at the end.")
    evaluation.add_argument("--per_device_eval_batch_size", type=int, default=64)
    evaluation.add_argument("--num_beams", type=int, default=4)
    evaluation.add_argument("--val_max_target_length", type=int,
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
    if args.checkpointing_steps not in (None, "epoch") and not args.checkpointing_steps.isdigit():
        parser.error(f"argument --checkpointing_steps: expected a number of steps or 'epoch', "
                     f"got {args.checkpointing_steps!r}")
    if args.max_tokens is None and args.per_device_train_batch_size is None:
        args.max_tokens = 4096
    args.val_max_target_length = args.val_max_target_length or args.max_target_length
    try:
        SkipOptions(**skip_flags(args))
    except ValueError as error:
        flag = next(name for name in SKIP_FLAGS if str(error).startswith(name))
        parser.error(f"argument --{flag}: {error}")
    return args


def skip_flags(args) -> dict:
    """The --skip_* options given on the command line."""
    return {name: getattr(args, name) for name in SKIP_FLAGS if getattr(args, name) is not None}


# ---------------------------------------------------------------------------------------------------- data

def load_raw_datasets(args) -> DatasetDict:
    """train/validation[/test] splits of (source, target) text pairs, from the Hub or from files."""
    if args.dataset_name:
        try:
            dataset = load_dataset(args.dataset_name, args.dataset_config_name)
        except (OSError, ValueError, ConnectionError) as error:
            raise TrainingError(f"cannot load --dataset_name {args.dataset_name}: {error}") from error
        names = {"train": "train", "validation": args.validation_split_name, "test": args.test_split_name}
        for split in ("train", "validation"):
            if names[split] not in dataset:
                raise TrainingError(f"{args.dataset_name} has no {names[split]!r} split; it has: "
                                    f"{', '.join(dataset)} (see --validation_split_name)")
        splits = {split: (dataset[name], f"{args.dataset_name}[{name}]") for split, name in names.items()
                  if name in dataset}
        raw = {split: text_pairs(data, args.source_lang, args.target_lang, where)
               for split, (data, where) in splits.items()}
    else:
        files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
        raw = {split: read_pairs(path, args.source_lang, args.target_lang) for split, path in files.items() if path}
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    for split, (pairs, where) in raw.items():
        if limits[split] is not None:
            pairs = pairs.select(range(min(limits[split], len(pairs))))
        raw[split] = check_no_empty_pairs(pairs, where, args.drop_empty_pairs)
    return DatasetDict(raw)


def text_pairs(dataset: Dataset, source_lang: str, target_lang: str, where: str) -> tuple[Dataset, str]:
    """Columns `source` and `target` from a 'translation' column of {lang: text} or from one column per language."""
    if "translation" in dataset.column_names:
        languages = sorted(dataset[0]["translation"]) if len(dataset) else []
        for lang in (source_lang, target_lang):
            if lang not in languages:
                raise TrainingError(f"{where} has no language {lang!r}; "
                                    f"its translations are in: {', '.join(languages)}")
        dataset = dataset.map(
            lambda batch: {"source": [pair[source_lang] for pair in batch["translation"]],
                           "target": [pair[target_lang] for pair in batch["translation"]]},
            batched=True, remove_columns=dataset.column_names,
        )
        return dataset, where
    for lang in (source_lang, target_lang):
        if lang not in dataset.column_names:
            raise TrainingError(f"{where} has no language {lang!r}; its columns are: {', '.join(dataset.column_names)}")
    dataset = dataset.select_columns([source_lang, target_lang])
    return dataset.rename_columns({source_lang: "source", target_lang: "target"}), where


def read_pairs(path: str, source_lang: str, target_lang: str) -> tuple[Dataset, str]:
    """A JSON lines file in the translation format, or parallel text files PATH.<lang>[.gz]."""
    if Path(path).name.split(".")[-1] in ("json", "jsonl") or path.endswith((".json.gz", ".jsonl.gz")):
        return text_pairs(read_data_file("json", path), source_lang, target_lang, path)
    files = {lang: parallel_file(Path(path), lang) for lang in (source_lang, target_lang)}
    source, target = (read_data_file("text", files[lang])["text"][:] for lang in (source_lang, target_lang))
    if len(source) != len(target):
        raise TrainingError(f"{files[source_lang]} has {len(source)} lines but {files[target_lang]} has "
                            f"{len(target)}: parallel files need one sentence per line, aligned")
    where = f"{files[source_lang]} / {files[target_lang]}"
    return Dataset.from_dict({"source": source, "target": target}), where


def parallel_file(prefix: Path, lang: str) -> Path:
    for candidate in (prefix.with_name(f"{prefix.name}.{lang}"), prefix.with_name(f"{prefix.name}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    if not prefix.parent.is_dir():
        raise TrainingError(f"{prefix}: no such folder {prefix.parent}")
    found = sorted(path.name for path in prefix.parent.glob(f"{prefix.name}.*"))
    languages = sorted({name.removeprefix(f"{prefix.name}.").removesuffix(".gz") for name in found})
    raise TrainingError(f"no file {prefix}.{lang} or {prefix}.{lang}.gz for language {lang!r}; "
                        + (f"files with this prefix: {', '.join(found)} (languages: {', '.join(languages)})"
                           if found else "no file starts with this prefix"))


def check_no_empty_pairs(pairs: Dataset, where: str, drop: bool) -> Dataset:
    empty = [index for index, (source, target) in enumerate(zip(pairs["source"][:], pairs["target"][:]))
             if not (source and source.strip() and target and target.strip())]
    if not empty:
        return pairs
    if drop:
        print(f"{where}: dropping {len(empty)} pairs with an empty side")
        return pairs.select(sorted(set(range(len(pairs))) - set(empty)))
    index = empty[0]
    side = "source" if not (pairs[index]["source"] or "").strip() else "target"
    raise TrainingError(f"{where}: line {index + 1} has an empty {side} sentence ({len(empty)} empty pairs in all; "
                        f"--drop_empty_pairs drops them)")


class LengthBatchSampler:
    """Batches of example indices for one epoch; `set_epoch` reshuffles them (from `seed` and the epoch).

    With `max_tokens`, examples of similar length share a batch (sorted by length, ties in random order), and a
    batch holds as many as fit in `max_tokens` padded tokens on its longer side, as in Vaswani et al. and fairseq;
    otherwise batches are `batch_size` random examples. Either way the batches come in random order.
    """

    def __init__(self, lengths: list[int], max_tokens: int | None = None, batch_size: int | None = None,
                 seed: int = 0):
        self.lengths = np.asarray(lengths)
        self.max_tokens, self.max_sentences, self.seed, self.epoch = max_tokens, batch_size, seed, 0
        self.num_batches = len(self.batches())  # the same every epoch: packing sees the same sorted lengths

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if self.max_tokens is None:
            return [order[start:start + self.max_sentences].tolist()
                    for start in range(0, len(order), self.max_sentences)]
        order = order[np.argsort(self.lengths[order], kind="stable")]
        batches, start = [], 0
        for end in range(1, len(order) + 1):
            if end == len(order) or self.lengths[order[end]] * (end + 1 - start) > self.max_tokens:
                batches.append(order[start:end].tolist())
                start = end
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        yield from self.batches()

    def __len__(self):
        return self.num_batches


# --------------------------------------------------------------------------------------- tokenizer and model

def load_tokenizer(args, raw: DatasetDict, checkpoint: Path | None, is_main_process: bool = True):
    """The tokenizer given, the checkpoint's, or a SentencePiece MarianTokenizer trained on the training data
    (by the main process: call the others after it, in `main_process_first`)."""
    name = args.tokenizer_name or args.model_name_or_path
    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise TrainingError(f"cannot load a tokenizer from {name}: {error} (see --tokenizer_name)") from error
    if checkpoint is not None:
        return AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    folder = Path(args.output_dir) / "tokenizer"
    if is_main_process:
        print(f"Training a SentencePiece tokenizer ({args.vocab_size} pieces, "
              f"{'joint' if args.joint_vocab else 'separate'}) on {len(raw['train'])} pairs")
        train_marian_tokenizer(raw["train"]["source"][:], raw["train"]["target"][:], folder, vocab_size=args.vocab_size,
                               joint=args.joint_vocab, source_lang=args.source_lang, target_lang=args.target_lang,
                               seed=args.seed)
    return AutoTokenizer.from_pretrained(folder)


def build_model(args, tokenizer) -> RSkipMarianMTModel:
    """A preset from scratch, or a Marian/RSkipMarian checkpoint with the --skip_* options applied."""
    try:
        if args.model_preset:
            config = RSkipMarianConfig(
                **MODEL_PRESETS[args.model_preset], **skip_flags(args),
                vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                max_position_embeddings=max(512, args.max_source_length, args.max_target_length + 1),
            )
        else:
            config = RSkipMarianConfig.from_pretrained(args.model_name_or_path)
            base = SkipOptions().to_dict() if args.skip_variant else config.skip_options().to_dict()
            config = RSkipMarianConfig.from_pretrained(args.model_name_or_path, **{**base, **skip_flags(args)})
        if args.config_overrides:
            config.update_from_string(args.config_overrides)
        config.skip_options()
    except ValueError as error:
        raise TrainingError(f"model configuration: {error}") from error
    except OSError as error:
        raise TrainingError(f"cannot load --model_name_or_path {args.model_name_or_path}: {error}") from error
    if len(tokenizer) > config.vocab_size or tokenizer.pad_token_id != config.pad_token_id:
        raise TrainingError(
            f"the tokenizer ({len(tokenizer)} tokens, pad id {tokenizer.pad_token_id}) does not match the model "
            f"({config.vocab_size} embeddings, pad id {config.pad_token_id}); use the model's own tokenizer "
            f"(leave out --tokenizer_name)"
        )
    if args.model_preset:
        model = RSkipMarianMTModel(config)
    else:
        model = RSkipMarianMTModel.from_pretrained(args.model_name_or_path, config=config)
    # Saved as generation_config.json: the pipeline and `generate` translate as the evaluation did.
    model.generation_config.update(
        num_beams=args.num_beams, max_new_tokens=args.val_max_target_length, max_length=None,
        decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, forced_eos_token_id=config.eos_token_id,
        bad_words_ids=[[config.pad_token_id]],
    )
    return model


def tokenize(raw: DatasetDict, tokenizer, args) -> DatasetDict:
    """`input_ids`, `attention_mask` and `labels`, truncated to --max_source_length / --max_target_length."""

    def encode(batch):
        inputs = tokenizer(batch["source"], max_length=args.max_source_length, truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["target"], max_length=args.max_target_length,
                                     truncation=True)["input_ids"]
        return inputs

    return raw.map(encode, batched=True, remove_columns=["source", "target"],
                   num_proc=args.preprocessing_num_workers, desc="Tokenizing")


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, dataloader, references: list[str], tokenizer, accelerator: Accelerator, desc: str,
             bleu_tokenize: str = "13a"):
    """Beam-search translations of `dataloader`'s sources, their sacreBLEU and chrF against `references`, and the
    per-token validation loss (no label smoothing). `model` is the plain (unwrapped) model."""
    was_training = model.training
    model.eval()
    synced_gpus = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    predictions, loss_sum, num_tokens = [], 0.0, 0
    for batch in tqdm(dataloader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
        losses = F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   synced_gpus=synced_gpus)
        generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
        generated, losses, tokens = accelerator.gather_for_metrics(
            (generated, losses.sum(1), (batch["labels"] != -100).sum(1)))
        predictions += tokenizer.batch_decode(generated, skip_special_tokens=True)
        loss_sum, num_tokens = loss_sum + losses.sum().item(), num_tokens + tokens.sum().item()
    model.train(was_training)
    bleu, chrf = BLEU(tokenize=bleu_tokenize), CHRF()
    scores = {
        "bleu": round(bleu.corpus_score(predictions, [references]).score, 2),
        "chrf": round(chrf.corpus_score(predictions, [references]).score, 2),
        "loss": round(loss_sum / num_tokens, 4),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
    return scores, predictions


def describe(scores: dict) -> str:
    return (f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f} loss {scores['loss']:.3f} "
            f"[{scores['bleu_signature']}] [{scores['chrf_signature']}]")


# --------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = create_accelerator(args)
    checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
    state = RunState.from_checkpoint(checkpoint, run_config(args, MAY_CHANGE_ON_RESUME,
                                                            num_processes=accelerator.num_processes))
    set_seed(args.seed)

    # Data, tokenizer, model
    with accelerator.main_process_first():
        raw = load_raw_datasets(args)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(args, raw, checkpoint, accelerator.is_main_process)
    model = build_model(args, tokenizer)
    with accelerator.main_process_first():
        tokenized = tokenize(raw, tokenizer, args)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100,
                                      pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    lengths = [max(len(source), len(target))
               for source, target in zip(tokenized["train"]["input_ids"][:], tokenized["train"]["labels"][:])]
    batch_sampler = LengthBatchSampler(lengths, max_tokens=args.max_tokens,
                                       batch_size=args.per_device_train_batch_size, seed=args.seed)
    # Own generators: iterating a loader then draws no number from the global RNG that dropout uses, so
    # evaluations and resumes leave the training trajectory unchanged.
    train_dataloader = DataLoader(tokenized["train"], batch_sampler=batch_sampler, collate_fn=collator,
                                  generator=torch.Generator().manual_seed(args.seed))
    eval_dataloaders = {
        split: DataLoader(tokenized[split], batch_size=args.per_device_eval_batch_size, collate_fn=collator,
                          generator=torch.Generator().manual_seed(args.seed))
        for split in ("validation", "test") if split in tokenized
    }

    # Optimizer and schedule: no weight decay on biases, norms and scales.
    skip = model.config.skip_options().to_dict()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": args.weight_decay},
         {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    updates_per_epoch = math.ceil(math.ceil(len(train_dataloader) / accelerator.num_processes)
                                  / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                                 num_training_steps=max_train_steps)

    model, optimizer, train_dataloader, lr_scheduler, *prepared = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler, *eval_dataloaders.values())
    eval_dataloaders = dict(zip(eval_dataloaders, prepared))
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    if args.with_tracking:
        init_tracking(accelerator, "translation", vars(args))

    # Resume: weights, optimizer, schedule and RNG from the checkpoint; the data position is in `state`.
    best_dir = output_dir / BEST_MODEL
    if checkpoint:
        resume(accelerator, checkpoint, state, best_dir)

    total_batch = (f"{args.max_tokens} tokens" if args.max_tokens else f"{args.per_device_train_batch_size} sentences")
    accelerator.print(
        f"{sum(p.numel() for p in parameters) / 1e6:.1f}M parameters, skip connection {skip}\n"
        f"{len(raw['train'])} training pairs, {updates_per_epoch} updates per epoch of {total_batch} x "
        f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation; "
        f"{max_train_steps} updates ({num_epochs} epochs)"
    )
    references = {split: raw[split]["target"][:] for split in eval_dataloaders}

    def batch_loss(model, batch):  # label-smoothed, summed over the target tokens
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=args.label_smoothing, reduction="sum")

    def validate():
        scores, predictions = evaluate(accelerator.unwrap_model(model), eval_dataloaders["validation"],
                                       references["validation"], tokenizer, accelerator, "validation",
                                       args.bleu_tokenize)
        state.history.append({"step": state.step, "epoch": state.epoch,
                              **{name: scores[name] for name in ("bleu", "chrf", "loss")}})
        accelerator.log({f"validation/{name}": scores[name] for name in ("bleu", "chrf", "loss")}, step=state.step)
        improved = state.best is None or (scores["bleu"], scores["chrf"]) > (state.best["bleu"], state.best["chrf"])
        accelerator.print(f"step {state.step}: validation {describe(scores)}{' (best so far)' if improved else ''}")
        if improved:
            state.best = {"step": state.step, **scores}
            save_best_model(accelerator, model, best_dir, state.best, tokenizer,
                            {"predictions_validation.txt": "\n".join(predictions) + "\n"})

    # Training
    start_time = time.time()
    train_loop(accelerator, model, optimizer, lr_scheduler, train_dataloader, state, args, max_train_steps,
               batch_loss=batch_loss, count_name="tokens", validate=validate,
               # Accelerate passes the epoch on to an unwrapped batch sampler only: set both.
               on_epoch=batch_sampler.set_epoch,
               checkpoint_extra=lambda folder: tokenizer.save_pretrained(folder / "tokenizer"))
    runtime = time.time() - start_time

    # Test with the best model, and the Hub-ready output folder: best model, tokenizer, results, curves.
    best_model = RSkipMarianMTModel.from_pretrained(best_dir).to(accelerator.device)
    results = {"skip": skip, **run_results(accelerator, model, state, args, runtime, command_line(__file__, argv))}
    if "test" in eval_dataloaders:
        results["test"], predictions = evaluate(best_model, eval_dataloaders["test"], references["test"], tokenizer,
                                                accelerator, "test", args.bleu_tokenize)
        accelerator.print(f"test (best model, step {results['best_step']}): {describe(results['test'])}")
        if accelerator.is_main_process:
            (output_dir / "predictions_test.txt").write_text("\n".join(predictions) + "\n")
    finish_output(accelerator, args, best_dir, results, curves=["loss", "bleu"], ignore_patterns=("tokenizer/*",))
    accelerator.print(f"Saved the best model (step {results['best_step']}) and results.json to {output_dir}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_main(main)
