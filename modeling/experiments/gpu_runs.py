"""The GPU script's two kinds of run (`rskip.experiments.gpu_evidence` says the recipes): `CifarRun`, a PreAct-ResNet
on CIFAR-10 images decoded onto the device and augmented there, and `DepthRun`, an RSkipMarianMTModel on the carried
number task. Each builds its model, probes its cost and trains within a deadline."""

import contextlib
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from transformers import get_scheduler

from ..configuration_rskip_marian import RSkipMarianConfig
from ..modeling_rskip_marian import RSkipMarianMTModel
from ..skip_options import ResNetSkipOptions
from .depth_rules import REGIMES, divergence_threshold, task_outcome, unigram_loss
from .gpu_budget import RunCost
from .summaries import binomial_error

CIFAR_VARIANTS = {"plain": {"skip_variant": "plain"}, "post_ln": {"skip_variant": "post_ln"},
                  "rskip_ln K=2": {"skip_variant": "rskip_ln", "skip_recursions": 2},
                  "rskip_ln K=3": {"skip_variant": "rskip_ln", "skip_recursions": 3}}
DEPTH_VARIANTS = {"post_ln": {"skip_variant": "post_ln"}, "pre_ln": {"skip_variant": "pre_ln"},
                  "rskip_ln K=2": {"skip_variant": "rskip_ln", "skip_recursions": 2}}
TOKENS_PER_BATCH = 2048


def augment(images, generator, padding: int = 4):
    """He et al.'s augmentation of a uint8 batch (N, C, H, W), on its device: zero-pad by `padding`, crop a random
    H x W window, flip half the images horizontally."""
    count, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (count,), device=images.device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count,), device=images.device, generator=generator)
    rows = (top[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    columns = (left[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    crops = padded[torch.arange(count, device=images.device)[:, None, None, None],
                   torch.arange(channels, device=images.device)[None, :, None, None], rows, columns]
    flip = torch.rand(count, device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class CifarRun:
    """One PreAct-ResNet on the decoded images, trained with the recipe above."""

    def __init__(self, context: dict, device):
        self.context, self.device = context, device
        data = torch.load(context["decoded"], weights_only=True)
        validation = context["validation_images"]
        self.images = data["images"].to(device)
        self.labels = data["labels"].to(device)
        self.train_count = len(self.labels) - validation

    def build(self, variant: str, seed: int):
        torch.manual_seed(seed)
        model = timm.create_model(self.context["cifar_model"], num_classes=10,
                                  **ResNetSkipOptions(**CIFAR_VARIANTS[variant]).to_dict())
        model = model.to(self.device, memory_format=torch.channels_last)
        mean = torch.tensor(model.pretrained_cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(model.pretrained_cfg["std"], device=self.device).view(1, 3, 1, 1) * 255
        # timm's optimizer factory leaves biases and norms out of weight decay, as the training command does.
        optimizer = create_optimizer_v2(model, opt="momentum", lr=0.1, weight_decay=1e-4, momentum=0.9)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return model, optimizer, generator, (mean, std)

    def normalise(self, images, statistics):
        mean, std = statistics
        return ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    def batches(self, generator):
        batch = self.context["batch_size"]
        while True:
            order = torch.randperm(self.train_count, device=self.device, generator=generator)
            for start in range(0, self.train_count - batch + 1, batch):
                yield order[start:start + batch]

    def step(self, model, optimizer, generator, statistics, indices):
        inputs = self.normalise(augment(self.images[indices], generator), statistics)
        with autocast(self.device):
            loss = F.cross_entropy(model(inputs).float(), self.labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def evaluate(self, model, statistics) -> dict:
        model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for start in range(self.train_count, len(self.labels), 1000):
                stop = min(start + 1000, len(self.labels))
                with autocast(self.device):
                    logits = model(self.normalise(self.images[start:stop], statistics)).float()
                labels = self.labels[start:stop]
                correct += (logits.argmax(1) == labels).sum().item()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        model.train()
        count = len(self.labels) - self.train_count
        top1 = correct / count
        return {"top1": 100 * top1, "top1_error": 100 * binomial_error(top1, count), "loss": loss_sum / count,
                "images": count}

    def probe(self, run: dict, updates: int) -> RunCost:
        started = time.perf_counter()
        model, optimizer, generator, statistics = self.build(run["variant"], run["seed"])
        built = time.perf_counter() - started
        batches = self.batches(generator)
        warmup = max(3, updates // 4)  # cuDNN's autotuning and the first allocations
        for _ in range(warmup):
            self.step(model, optimizer, generator, statistics, next(batches))
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(updates):
            self.step(model, optimizer, generator, statistics, next(batches))
        synchronize(self.device)
        update_seconds = (time.perf_counter() - started) / updates
        started = time.perf_counter()
        self.evaluate(model, statistics)
        return RunCost(update_seconds, built + time.perf_counter() - started)

    def train(self, run: dict, updates: int, deadline: float, log) -> dict:
        model, optimizer, generator, statistics = self.build(run["variant"], run["seed"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=updates, pct_start=0.15,
                                                       cycle_momentum=False)
        batches, started = self.batches(generator), time.time()

        def update_once():
            loss = self.step(model, optimizer, generator, statistics, next(batches))
            schedule.step()
            return loss

        curve, stopped, _, update = train_until(update_once, schedule, updates, deadline, run["name"], log)
        scores = self.evaluate(model, statistics)
        log(f"{run['name']} validation top-1 {scores['top1']:.2f}% loss {scores['loss']:.4f}")
        return {**run, **scores, "updates": updates, "updates_done": update, "stopped": stopped,
                "training_loss": curve, "seconds": time.time() - started}


# ------------------------------------------------------------------------------------------ depth-map runs

def token_batches(lengths: list[int], max_tokens: int, generator) -> list[list[int]]:
    """Indices in batches of at most `max_tokens` padded tokens (longest side times sentences), similar lengths
    together, ties and batch order random: `rskip-train-translation`'s batching (LengthBatchSampler, which lives
    with the training library's data dependencies)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order.sort(key=lambda index: lengths[index])
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or lengths[order[end]] * (end + 1 - start) > max_tokens:
            batches.append(order[start:end])
            start = end
    return [batches[index] for index in torch.randperm(len(batches), generator=generator).tolist()]


class DepthRun:
    """One RSkipMarianMTModel on the carried number task, trained with the recipe above."""

    def __init__(self, context: dict, device):
        self.context, self.device = context, device
        task = json.loads((Path(context["carry"]) / "numbers.json").read_text())
        self.task, self.pieces = task, task["pieces"]
        self.vocab_size = len(self.pieces)
        self.splits = task["splits"]
        self.unigram = unigram_loss(self.splits["train"]["target_ids"], self.splits["valid"]["target_ids"],
                                    self.vocab_size)
        self.max_target = max(len(ids) for split in self.splits.values() for ids in split["target_ids"])

    def build(self, run: dict):
        width = self.context["width"]
        layers = run["depth"]
        config = dict(self.task["model_config"], d_model=width["d_model"], encoder_layers=layers,
                      decoder_layers=layers, encoder_attention_heads=width["heads"],
                      decoder_attention_heads=width["heads"], encoder_ffn_dim=width["ffn_dim"],
                      decoder_ffn_dim=width["ffn_dim"])
        pad, eos = self.task["pad_token_id"], self.task["eos_token_id"]
        torch.manual_seed(run["seed"])
        model = RSkipMarianMTModel(RSkipMarianConfig(
            **config, **DEPTH_VARIANTS[run["variant"]], vocab_size=self.vocab_size, pad_token_id=pad,
            eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=eos, max_position_embeddings=512))
        # rskip-train-translation's beam of 4; an output longer than the longest reference cannot match, so
        # generation stops there (an untrained model would otherwise run to the position limit).
        model.generation_config.update(num_beams=4, max_new_tokens=self.max_target + 1, max_length=None,
                                       decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad,
                                       forced_eos_token_id=eos, bad_words_ids=[[pad]])
        model.to(self.device)
        learning_rate, _ = REGIMES[run["regime"]]
        # rskip-train-translation's defaults: no weight decay, epsilon 1e-9.
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), eps=1e-9,
                                      weight_decay=0.0)
        return model, optimizer

    def padded(self, split: str, indices: list[int]) -> dict:
        pad = self.task["pad_token_id"]
        sources = [self.splits[split]["source_ids"][i] for i in indices]
        targets = [self.splits[split]["target_ids"][i] for i in indices]

        def stack(sequences, fill):
            width = max(len(ids) for ids in sequences)
            return torch.tensor([ids + [fill] * (width - len(ids)) for ids in sequences], device=self.device)

        input_ids = stack(sources, pad)
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(), "labels": stack(targets, -100)}

    def epochs(self, generator):
        lengths = [max(len(source), len(target)) for source, target in
                   zip(self.splits["train"]["source_ids"], self.splits["train"]["target_ids"])]
        while True:
            for indices in token_batches(lengths, TOKENS_PER_BATCH, generator):
                yield self.padded("train", indices)

    def loss(self, model, batch, label_smoothing: float):
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        with autocast(self.device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing, reduction="sum"), (batch["labels"] != -100).sum()

    def step(self, model, optimizer, schedule, batch):
        loss_sum, tokens = self.loss(model, batch, 0.1)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return (loss_sum / tokens).detach()

    def schedule(self, optimizer, run: dict, updates: int):
        _, warmup_fraction = REGIMES[run["regime"]]
        warmup = round(warmup_fraction * updates)
        return get_scheduler("inverse_sqrt", optimizer, num_warmup_steps=warmup, num_training_steps=updates)

    def evaluate(self, model) -> dict:
        model.eval()
        with torch.no_grad():
            valid = self.padded("valid", list(range(len(self.splits["valid"]["targets"]))))
            loss_sum, tokens = self.loss(model, valid, 0.0)
            test = self.padded("test", list(range(len(self.splits["test"]["targets"]))))
            with autocast(self.device):
                generated = model.generate(input_ids=test["input_ids"], attention_mask=test["attention_mask"])
        model.train()
        special = set(self.task["special_ids"])
        predictions = ["".join(self.pieces[i] for i in ids if i not in special).replace("\u2581", " ").strip()
                       for ids in generated.tolist()]
        references = self.splits["test"]["targets"]
        matches = sum(prediction == reference.strip() for prediction, reference in zip(predictions, references))
        return {"valid_loss": (loss_sum / tokens).item(), "exact_match": 100 * matches / len(references),
                "test_sentences": len(references), "example": {"reference": references[0],
                                                               "prediction": predictions[0]}}

    def probe(self, run: dict, updates: int) -> RunCost:
        started = time.perf_counter()
        model, optimizer = self.build(run)
        built = time.perf_counter() - started
        schedule = self.schedule(optimizer, run, updates * 2)
        batches = self.epochs(torch.Generator().manual_seed(run["seed"]))
        for _ in range(max(3, updates // 4)):
            self.step(model, optimizer, schedule, next(batches))
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(updates):
            self.step(model, optimizer, schedule, next(batches))
        synchronize(self.device)
        update_seconds = (time.perf_counter() - started) / updates
        started = time.perf_counter()
        self.evaluate(model)  # an untrained model generates up to the longest reference: the slowest evaluation
        return RunCost(update_seconds, built + time.perf_counter() - started)

    def train(self, run: dict, updates: int, deadline: float, log) -> dict:
        model, optimizer = self.build(run)
        schedule = self.schedule(optimizer, run, updates)
        batches, started = self.epochs(torch.Generator().manual_seed(run["seed"])), time.time()
        curve, stopped, diverged, update = train_until(
            lambda: self.step(model, optimizer, schedule, next(batches)), schedule, updates, deadline, run["name"], log)
        scores = self.evaluate(model)
        scores["outcome"] = "diverges" if diverged else task_outcome(
            scores["valid_loss"], scores["exact_match"], divergence_threshold(self.vocab_size))
        log(f"{run['name']} valid loss {scores['valid_loss']:.4f} exact match {scores['exact_match']:.1f}% "
            f"{scores['outcome']}")
        return {**run, **scores, "updates": updates, "updates_done": update, "stopped": stopped,
                "training_loss": curve, "seconds": time.time() - started, "unigram_loss": self.unigram,
                "divergence_loss": math.log(self.vocab_size) + 1}


def train_until(update_once, schedule, updates: int, deadline: float, name: str, log):
    """Run `update_once()` (one update; returns its loss as a tensor) `updates` times or until `deadline`, logging the
    mean loss about 50 times; stop at a non-finite mean. Returns (curve, stopped: why it ended early or None,
    diverged, the last update done)."""
    curve, stopped, diverged, started = [], None, False, time.time()
    interval = max(1, updates // 50)
    losses = None
    for update in range(1, updates + 1):
        loss = update_once()
        losses = loss if losses is None else losses + loss  # summed on the device: one sync per interval
        if update % interval == 0 or update == updates:
            mean_loss = losses.item() / (interval if update % interval == 0 else update % interval)
            losses = None
            curve.append((update, mean_loss))
            log(f"{name} update {update}/{updates} loss {mean_loss:.4f} "
                f"lr {schedule.get_last_lr()[0]:.2e} {time.time() - started:.0f} s")
            if not math.isfinite(mean_loss):
                stopped, diverged = f"non-finite training loss at update {update}", True
                break
        if time.time() > deadline:
            stopped = f"stopped at update {update} of {updates}: the part's deadline"
            break
    return curve, stopped, diverged, update


def autocast(device):
    """bf16 autocast on a GPU; full precision on the CPU (the tests' device), where bf16 is slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PARTS = {"cifar": CifarRun, "depth": DepthRun}


__all__ = ["CIFAR_VARIANTS", "DEPTH_VARIANTS", "PARTS", "TOKENS_PER_BATCH", "CifarRun", "DepthRun", "augment",
           "autocast", "synchronize", "token_batches"]
