"""Translation: the data pipeline, batching, tokenizer, model building and evaluation of RSkipMarian training,
and `TranslationTask`, the parts `rskip.training.train` needs.

    from rskip.training import TrainingConfig, train
    from rskip.training.translation import TranslationTask, LengthBatchSampler, build_model, evaluate

The recipe is Vaswani et al.'s: Adam (β2 = 0.98), inverse-square-root schedule with warmup, label smoothing,
length-grouped batches of `max_tokens` tokens, beam search, sacreBLEU. Data comes from the Hub (a 'translation'
column of {lang: text} pairs, or one column per language), JSON lines in the same format, or parallel text files
PREFIX.<lang>[.gz]. Settings are read from `args`, a parsed command line (`rskip.training.cli`).
"""

from pathlib import Path

import evaluate as hf_evaluate
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, get_scheduler

from ..configuration_rskip_marian import RSkipMarianConfig
from ..modeling_rskip_marian import RSkipMarianMTModel
from ..skip_options import SkipOptions
from ..tokenization import train_marian_tokenizer
from .data import read_data_file
from .errors import TrainingError, main_process_first
from .loop import TrainingTask

# The `evaluate` metric module of this package: sacreBLEU's BLEU and chrF with their signatures, read from this
# folder (no network): `evaluate.load(TRANSLATION_METRIC)`.
TRANSLATION_METRIC = str(Path(__file__).with_name("translation_scores.py"))

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
# A run may be resumed with other values for these: they do not change the trained weights, except the training
# length (with the default inverse_sqrt schedule, a longer run passes through the same weights).
MAY_CHANGE_ON_RESUME = frozenset({
    "max_train_steps", "num_train_epochs",
    "per_device_eval_batch_size", "num_beams", "val_max_target_length", "bleu_tokenize", "max_eval_samples",
    "max_predict_samples",
    "preprocessing_num_workers",
})


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
        try:
            train_marian_tokenizer(raw["train"]["source"][:], raw["train"]["target"][:], folder,
                                   vocab_size=args.vocab_size, joint=args.joint_vocab, source_lang=args.source_lang,
                                   target_lang=args.target_lang, seed=args.seed)
        except RuntimeError as error:  # SentencePiece refuses a vocabulary the data cannot fill, or too small
            raise TrainingError(f"--vocab_size {args.vocab_size}: SentencePiece cannot train this vocabulary on the "
                                f"training data ({str(error).strip().splitlines()[-1]})") from error
    return AutoTokenizer.from_pretrained(folder)


def build_model(args, tokenizer) -> RSkipMarianMTModel:
    """A preset from scratch, or a Marian/RSkipMarian checkpoint with the --skip_* options applied."""
    try:
        if args.model_preset:
            config = RSkipMarianConfig(
                **MODEL_PRESETS[args.model_preset], **SkipOptions.given(args),
                vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                max_position_embeddings=max(512, args.max_source_length, args.max_target_length + 1),
            )
        else:
            config = RSkipMarianConfig.from_pretrained(args.model_name_or_path)
            base = SkipOptions().to_dict() if args.skip_variant else config.skip_options().to_dict()
            config = RSkipMarianConfig.from_pretrained(args.model_name_or_path, **{**base, **SkipOptions.given(args)})
        if args.config_overrides:
            config.update_from_string(args.config_overrides)
        config.skip_options()  # overrides bypass the checks made when the config was created: make them again
        config.check_shapes()
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
    """Beam-search translations of `dataloader`'s sources, their sacreBLEU and chrF against `references`
    (`load_translation_metric`), and the per-token loss (no label smoothing). `model` may be wrapped by `prepare`:
    `generate` runs on the unwrapped model."""
    model = accelerator.unwrap_model(model)
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
    scores = load_translation_metric().compute(predictions=predictions, references=references,
                                               bleu_tokenize=bleu_tokenize)
    return {**scores, "loss": round(loss_sum / num_tokens, 4)}, predictions


def describe(scores: dict) -> str:
    return (f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f} loss {scores['loss']:.3f} "
            f"[{scores['bleu_signature']}] [{scores['chrf_signature']}]")


def load_translation_metric():
    """`evaluate.load` of this package's BLEU and chrF metric module, kept in memory (no cache files, so processes
    computing it side by side do not share a lock)."""
    return hf_evaluate.load(TRANSLATION_METRIC, keep_in_memory=True)


def create_optimizer(model, args) -> torch.optim.AdamW:
    """Adam(W) over the trainable parameters, with no weight decay on biases, norms and scales."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": args.weight_decay},
         {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )


class TranslationTask(TrainingTask):
    """RSkipMarian translation for `rskip.training.train`: the best model has the highest validation (BLEU, chrF);
    the test split, when given, is translated once by the best model at the end."""

    name = "translation"
    count_name = "tokens"
    history_metrics = ("loss", "bleu", "chrf")
    may_change_on_resume = MAY_CHANGE_ON_RESUME
    hub_ignore_patterns = ("tokenizer/*",)

    @property
    def batch_description(self) -> str:
        return (f"{self.args.max_tokens} tokens" if self.args.max_tokens
                else f"{self.args.per_device_train_batch_size} sentences")

    def load_data(self, accelerator, checkpoint):
        self.raw = main_process_first(accelerator, lambda: load_raw_datasets(self.args))
        self.processor = main_process_first(
            accelerator, lambda: load_tokenizer(self.args, self.raw, checkpoint, accelerator.is_main_process))
        self.references = {split: self.raw[split]["target"][:] for split in ("validation", "test") if split in self.raw}

    def build_model(self):
        model = build_model(self.args, self.processor)
        self.skip_options = model.config.skip_options()
        return model

    def create_dataloaders(self, model, accelerator):
        args, tokenizer = self.args, self.processor
        tokenized = main_process_first(accelerator, lambda: tokenize(self.raw, tokenizer, args))
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100,
                                          pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
        lengths = [max(len(source), len(target))
                   for source, target in zip(tokenized["train"]["input_ids"][:], tokenized["train"]["labels"][:])]
        self.batch_sampler = LengthBatchSampler(lengths, max_tokens=args.max_tokens,
                                                batch_size=args.per_device_train_batch_size, seed=args.seed)
        # Own generators: iterating a loader then draws no number from the global RNG that dropout uses, so
        # evaluations and resumes leave the training trajectory unchanged.
        train_dataloader = DataLoader(tokenized["train"], batch_sampler=self.batch_sampler, collate_fn=collator,
                                      generator=torch.Generator().manual_seed(args.seed))
        eval_dataloaders = {
            split: DataLoader(tokenized[split], batch_size=args.per_device_eval_batch_size, collate_fn=collator,
                              generator=torch.Generator().manual_seed(args.seed))
            for split in ("validation", "test") if split in tokenized
        }
        return train_dataloader, eval_dataloaders

    def create_optimizer(self, model):
        return create_optimizer(model, self.args)

    def create_scheduler(self, optimizer, max_train_steps):
        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=self.args.num_warmup_steps,
                             num_training_steps=max_train_steps)

    def summary(self, model) -> str:
        parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (f"{parameters / 1e6:.1f}M parameters, skip connection {self.skip_options.used()}\n"
                f"{len(self.raw['train'])} training pairs")

    def set_epoch(self, epoch):
        # Accelerate passes the epoch on to an unwrapped batch sampler only.
        self.batch_sampler.set_epoch(epoch)

    def batch_loss(self, model, batch):
        """Label-smoothed cross-entropy, summed over the target tokens."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=self.args.label_smoothing, reduction="sum")

    def evaluate(self, model, dataloader, accelerator, split):
        scores, predictions = evaluate(model, dataloader, self.references[split], self.processor, accelerator, split,
                                       self.args.bleu_tokenize)
        return scores, {f"predictions_{split}.txt": "\n".join(predictions) + "\n"}

    def is_better(self, scores, best):
        return (scores["bleu"], scores["chrf"]) > (best["bleu"], best["chrf"])

    describe_scores = staticmethod(describe)

    def save_to_checkpoint(self, folder):
        self.processor.save_pretrained(folder / "tokenizer")

    def finish(self, accelerator, best_dir, eval_dataloaders, output_dir):
        """The test split's scores with the best model (and its translations, predictions_test.txt)."""
        if "test" not in eval_dataloaders:
            return {}
        best_model = RSkipMarianMTModel.from_pretrained(best_dir).to(accelerator.device)
        scores, files = self.evaluate(best_model, eval_dataloaders["test"], accelerator, "test")
        accelerator.print(f"test (best model): {describe(scores)}")
        if accelerator.is_main_process:
            for name, text in files.items():
                (Path(output_dir) / name).write_text(text)
        return {"test": scores}


__all__ = [
    "MODEL_PRESETS",
    "TRANSLATION_METRIC",
    "load_raw_datasets",
    "text_pairs",
    "read_pairs",
    "check_no_empty_pairs",
    "LengthBatchSampler",
    "load_tokenizer",
    "build_model",
    "tokenize",
    "evaluate",
    "load_translation_metric",
    "create_optimizer",
    "TranslationTask",
]
