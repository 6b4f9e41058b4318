"""The GPU half of the results in one timed go (`scripts/gpu_evidence.sh OUTPUT_DIR [--budget_minutes 8]`):

1. CIFAR-10 with He et al.'s PreAct-ResNet-110: `plain`, `post_ln`, `rskip_ln` K = 2 and K = 3, up to 3 seeds
   (2 where the budget cannot carry 3). The training images are decoded once into a uint8 tensor on the GPU and
   augmented there (4-pixel pad, random 32x32 crop, horizontal flip); bf16 autocast, channels_last; SGD with
   momentum 0.9, peak rate 0.1, weight decay 1e-4 (not on norms and biases, timm's optimizer), batches of 128, a
   one-cycle schedule over the chosen number of updates (from 0.004 up to 0.1 over the first 15%, then a cosine
   down to nearly 0: a run of a few epochs needs its rate to fall to the end, where He et al.'s step decay assumes
   164 epochs; the low start stands in for their warm-up of the 110-layer net). Validation: the last 5,000
   training images; top-1 with its binomial error and the seeds' spread.
2. The depth map at width 256 (d_model 256, FFN 1024, 4 heads): the number task of `make demo`, encoder-decoder
   depths 6+6, 12+12 and 24+24, a moderate (peak 1e-3, warm-up a sixth of the run) and an aggressive (peak 3e-3, no
   warm-up) regime, `post_ln`, `pre_ln` and `rskip_ln` K = 2, with `rskip-train-translation`'s recipe (batches of
   2,048 tokens, Adam(0.9, 0.98), inverse-square-root schedule, label smoothing 0.1, clipping at 1). Per cell: test
   exact match, final validation loss and the outcome (diverges: a non-finite loss or a final validation loss above
   ln(vocab) + 1; trains: at least half of the test numbers exactly right; stalls: fewer), as the CPU grid decides.

Runs side by side: one process per run (or per group of runs of one depth), all sharing the GPU. Small kernels
(ResNet-110's 16-64 channels, width-256 transformers) leave a single process launch-bound on the CPU: separate
processes keep the GPU fed from 16 cores, need no change to the models or the training step, and a run that fails
takes no other down. (CUDA streams in one process share one Python interpreter's launch rate.)

The budget: the time since the shell script started (installing the wheels included) counts. A reserve of 8% of
the budget (at least 5 s) is kept for writing the results and exiting; of the rest, the CIFAR part gets
`--cifar_share` (half by default) and the depth map whatever is left when the CIFAR part ends. In each part the
runs' processes start, load their data, wait for each other and then all probe their model together (a few updates
and one evaluation, timed under the same sharing of the GPU as the runs), and `choose_plan` picks the seeds and the
number of updates that fit the part's time with a 10% margin; a run stops in time for its evaluation if the part's
deadline comes first, and says so. Nothing is tuned on a test split: the schedule's length is chosen from timings
alone.

Writes OUTPUT_DIR/results.md, results.json, cifar_top1.png, cifar_training_loss.png, depth_map.png and logs/.
"""

import contextlib
import hashlib
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import forkserver
from multiprocessing.connection import wait
from pathlib import Path

import PIL.Image
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from transformers import get_scheduler

from ..command_line import COUNT, POSITIVE, CommandParser, bounded, output_folder
from ..configuration_rskip_marian import RSkipMarianConfig
from ..modeling_rskip_marian import RSkipMarianMTModel
from ..skip_options import ResNetSkipOptions
from .depth_rules import REGIMES, TRAINS_AT_EXACT_MATCH, divergence_threshold, task_outcome, unigram_loss
from .summaries import binomial_error, fmt, mean_std, verdict

CARRY = ".cache/gpu-evidence"
CARRY_FILES = ("manifest.json", "cifar10.pt", "numbers.json")
CIFAR_VARIANTS = {"plain": {"skip_variant": "plain"}, "post_ln": {"skip_variant": "post_ln"},
                  "rskip_ln K=2": {"skip_variant": "rskip_ln", "skip_recursions": 2},
                  "rskip_ln K=3": {"skip_variant": "rskip_ln", "skip_recursions": 3}}
DEPTH_VARIANTS = {"post_ln": {"skip_variant": "post_ln"}, "pre_ln": {"skip_variant": "pre_ln"},
                  "rskip_ln K=2": {"skip_variant": "rskip_ln", "skip_recursions": 2}}
MIN_SEEDS = 2
# Below these numbers of updates a run is reported as too short to be evidence (the figures are still shown).
MIN_UPDATES = {"cifar": 2000, "depth": 500}
# Of the budget, for collecting and writing the results and for the processes' exit (seconds on a busy machine).
RESERVE_FRACTION, RESERVE_SECONDS = 0.08, 5.0
PLAN_MARGIN = 0.10  # of a part's time, for what the probe did not see
CIFAR_BATCH = 128
TOKENS_PER_BATCH = 2048


def parse_args(argv=None):
    parser = CommandParser(prog="gpu_evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=output_folder, help="Where results, plots and logs are written.")
    parser.add_argument("--budget_minutes", type=POSITIVE, default=8.0,
                        help="Wall time for everything, from --started (the shell script's start) to the results.")
    parser.add_argument("--started", type=POSITIVE, help="Unix time the budget counts from (default: now).")
    parser.add_argument("--carry", default=CARRY, help="The folder scripts/gpu_evidence_pack.sh wrote.")
    parser.add_argument("--replot", action="store_true", help="Only draw the PNGs again from OUTPUT_DIR/results.json "
                        "(where the GPU machine had no matplotlib).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda where present, else cpu).")
    parser.add_argument("--seeds", type=bounded(int, MIN_SEEDS), default=3, help="At most this many seeds per cell.")
    parser.add_argument("--parallel", type=COUNT, default=16,
                        help="Processes side by side on the device (the depth map has at least one per depth).")
    parser.add_argument("--cifar_share", type=bounded(float, 0, 1, low_open=True, high_open=True), default=0.5,
                        help="The CIFAR part's share of the time; the depth map has the rest.")
    parser.add_argument("--probe_updates", type=COUNT, default=20, help="Timed updates of the throughput probe.")
    smaller = parser.add_argument_group("smaller settings (tests)")
    smaller.add_argument("--cifar_model", default="preact_resnet110")
    smaller.add_argument("--validation_images", type=COUNT, default=5000,
                         help="The last N carried images are the validation split.")
    smaller.add_argument("--batch_size", type=COUNT, default=CIFAR_BATCH)
    smaller.add_argument("--depths", type=COUNT, nargs="+", default=[6, 12, 24],
                         help="Encoder (= decoder) layers of the depth map's rows.")
    smaller.add_argument("--d_model", type=COUNT, default=256)
    smaller.add_argument("--ffn_dim", type=COUNT, default=1024)
    smaller.add_argument("--heads", type=COUNT, default=4)
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        parser.error(f"argument --heads: {args.heads} does not divide --d_model {args.d_model}")
    return args


# ------------------------------------------------------------------------------------------- the budget chooser

@dataclass(frozen=True)
class RunCost:
    """What the probe measured for one run: seconds per update, and fixed seconds (building the model, evaluating
    it at the end)."""
    update_seconds: float
    fixed_seconds: float


@dataclass(frozen=True)
class Plan:
    seeds: int
    updates: int  # 0: not even one update fits
    enough: bool  # updates >= the part's floor (MIN_UPDATES)


def choose_plan(workers: list[list[tuple[int, RunCost]]], seconds: float, min_updates: int, max_seeds: int,
                min_seeds: int = MIN_SEEDS, margin: float = PLAN_MARGIN) -> Plan:
    """The seeds and the number of updates per run (the same for every run) that let every worker finish its runs,
    one after the other, within `seconds` less the margin: the most seeds (from `max_seeds` down to `min_seeds`)
    whose runs reach `min_updates`, else `min_seeds` with as many updates as fit. `workers` lists each worker's runs
    as (seed, cost); runs of seeds >= the chosen number are left out."""
    usable = seconds * (1 - margin)
    best = None
    for seeds in range(max_seeds, min_seeds - 1, -1):
        limits = []
        for runs in workers:
            kept = [cost for seed, cost in runs if seed < seeds]
            if kept:
                fixed = sum(cost.fixed_seconds for cost in kept)
                limits.append((usable - fixed) / sum(cost.update_seconds for cost in kept))
        updates = max(0, math.floor(min(limits))) if limits else 0
        best = Plan(seeds, updates, updates >= min_updates)
        if best.enough:
            return best
    return best


def assign_workers(kinds: dict[str, tuple[int, float]], workers: int) -> dict[str, int]:
    """How many processes each kind of run gets: `kinds` maps a kind to (its number of runs, the relative cost of
    one run). Each kind gets one, then each further process goes to the kind whose processes have the most work
    (runs per process times cost), while any has more runs than processes."""
    counts = {kind: 1 for kind in kinds}
    for _ in range(max(0, workers - len(kinds))):
        loads = {kind: math.ceil(runs / counts[kind]) * cost for kind, (runs, cost) in kinds.items()
                 if runs > counts[kind]}
        if not loads:
            break
        counts[max(loads, key=loads.get)] += 1
    return counts


def spread(runs: list[dict], processes: int) -> list[list[dict]]:
    """`runs` (seed-major order) dealt to `processes` in turn: every process gets low seeds first."""
    return [runs[start::processes] for start in range(processes) if runs[start::processes]]


# ------------------------------------------------------------------------------------------------- the carry

class CarryError(Exception):
    """What was carried is missing or damaged: one line says what and how to make it."""


def check_carry(folder: Path) -> dict:
    """The carry's manifest, after checking that its files are there with their sizes and SHA-256 (seconds)."""
    remedy = "run scripts/gpu_evidence_pack.sh here and carry its folder"
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise CarryError(f"no {manifest_file}: {remedy}")
    manifest = json.loads(manifest_file.read_text())
    for name in CARRY_FILES[1:]:
        if name not in manifest["files"]:
            raise CarryError(f"{manifest_file} lists no {name}: {remedy}")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            raise CarryError(f"{path} is missing or not {expected['bytes']} bytes: {remedy}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected["sha256"]:
            raise CarryError(f"{path} does not match its SHA-256 in the manifest: {remedy}")
    return manifest


def decode_cifar(carry: Path, destination: Path) -> dict:
    """The carried JPEGs decoded (with PIL, threads) into one uint8 tensor (N, 3, 32, 32) and its labels, saved to
    `destination` for the runs' processes to load onto the device."""
    packed = torch.load(carry / "cifar10.pt", weights_only=True)
    header, scans = bytes(packed["jpeg_header"].numpy()), packed["jpeg_scans"].numpy()
    offsets = packed["offsets"].tolist()
    count = len(offsets) - 1

    def decode(index: int):
        data = header + bytes(scans[offsets[index]:offsets[index + 1]])
        with PIL.Image.open(io.BytesIO(data)) as image:
            return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        pixels = list(pool.map(decode, range(count), chunksize=256))
    images = torch.stack(pixels).view(count, 32, 32, 3).permute(0, 3, 1, 2).contiguous()
    torch.save({"images": images, "labels": packed["labels"].long()}, destination)
    return {"images": count, "source": packed["source"]}


# ------------------------------------------------------------------------------------------------ CIFAR runs

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
        batches, curve, stopped, started = self.batches(generator), [], None, time.time()
        interval = max(1, updates // 50)
        losses = torch.zeros((), device=self.device)
        for update in range(1, updates + 1):
            losses += self.step(model, optimizer, generator, statistics, next(batches))
            schedule.step()
            if update % interval == 0 or update == updates:
                mean_loss = losses.item() / (interval if update % interval == 0 else update % interval)
                losses.zero_()
                curve.append((update, mean_loss))
                log(f"{run['name']} update {update}/{updates} loss {mean_loss:.4f} "
                    f"lr {schedule.get_last_lr()[0]:.4f} {time.time() - started:.0f} s")
                if not math.isfinite(mean_loss):
                    stopped = f"non-finite training loss at update {update}"
                    break
            if time.time() > deadline:
                stopped = f"stopped at update {update} of {updates}: the part's deadline"
                break
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
        batches = self.epochs(torch.Generator().manual_seed(run["seed"]))
        curve, stopped, diverged, started = [], None, False, time.time()
        interval = max(1, updates // 50)
        losses = torch.zeros((), device=self.device)
        for update in range(1, updates + 1):
            losses += self.step(model, optimizer, schedule, next(batches))
            if update % interval == 0 or update == updates:
                mean_loss = losses.item() / (interval if update % interval == 0 else update % interval)
                losses.zero_()
                curve.append((update, mean_loss))
                log(f"{run['name']} update {update}/{updates} loss {mean_loss:.4f} "
                    f"lr {schedule.get_last_lr()[0]:.2e} {time.time() - started:.0f} s")
                if not math.isfinite(mean_loss):
                    stopped, diverged = f"non-finite training loss at update {update}", True
                    break
            if time.time() > deadline:
                stopped = f"stopped at update {update} of {updates}: the part's deadline"
                break
        scores = self.evaluate(model)
        scores["outcome"] = "diverges" if diverged else task_outcome(
            scores["valid_loss"], scores["exact_match"], divergence_threshold(self.vocab_size))
        log(f"{run['name']} valid loss {scores['valid_loss']:.4f} exact match {scores['exact_match']:.1f}% "
            f"{scores['outcome']}")
        return {**run, **scores, "updates": updates, "updates_done": update, "stopped": stopped,
                "training_loss": curve, "seconds": time.time() - started, "unigram_loss": self.unigram,
                "divergence_loss": math.log(self.vocab_size) + 1}


def autocast(device):
    """bf16 autocast on a GPU; full precision on the CPU (the tests' device), where bf16 is slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PARTS = {"cifar": CifarRun, "depth": DepthRun}
# On a GPU the runs' processes fork from a server that imported torch, rskip, timm and transformers once and never
# touched the GPU: each starts in a moment instead of importing them again, and creates its own CUDA context (a
# process forked after CUDA was initialised cannot). On the CPU they fork from the main process, which has them.
START_METHODS = {"cuda": "forkserver", "cpu": "fork"}
PRELOAD = ["torch", "rskip", "timm.optim", "transformers", "rskip.experiments.gpu_evidence"]


def start_method(device) -> str:
    method = START_METHODS.get(device.type, "forkserver")
    if method == "forkserver":  # started now, it imports PRELOAD while the main process decodes the images

        multiprocessing.get_context(method).set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    return method


# ------------------------------------------------------------------------------------------------ the workers

def worker(part: str, index: int, runs: list[dict], context: dict, connection, barrier):
    """One process: loads its part's data onto the device, probes its costliest run with the others, waits for the
    plan, then trains its runs one after the other; every message goes back through `connection`."""
    log_file = open(Path(context["output_dir"]) / "logs" / f"{part}-process{index}.log", "w", buffering=1)
    sys.stdout = sys.stderr = log_file

    def log(line: str):
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    try:
        torch.set_num_threads(context["threads"])
        device = torch.device(context["device"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            runner = PARTS[part](context, device)
        except Exception:
            barrier.abort()  # the others probe without waiting for this process
            raise
        log(f"ready: {len(runs)} runs on {device}")
        try:
            barrier.wait(timeout=max(1.0, context["deadline"] - time.time()))
        except threading.BrokenBarrierError:
            log("another process failed before the probe (see its log): probing without waiting for it")
        cost = runner.probe(costliest(runs), context["probe_updates"])
        log(f"probe: {cost.update_seconds * 1000:.1f} ms per update, {cost.fixed_seconds:.1f} s fixed")
        connection.send(("probe", asdict(cost)))
        plan = connection.recv()
        if plan["updates"] < 1:
            log("no update fits in this part's time: nothing trained")
        for run in runs:
            # A run starts only if it can end, evaluation included, by the deadline; its training stops in time
            # for its evaluation.
            if plan["updates"] < 1 or run["seed"] >= plan["seeds"]:
                continue
            if time.time() + cost.fixed_seconds > plan["deadline"]:
                log(f"{run['name']}: not started, the part's deadline is too near")
                continue
            connection.send(("result", runner.train(run, plan["updates"], plan["deadline"] - cost.fixed_seconds,
                                                    log)))
    except Exception as error:  # reported as this process's failure; the other runs go on
        traceback.print_exc()
        connection.send(("error", f"{type(error).__name__}: {error}".splitlines()[0]))
    finally:
        connection.send(("done", None))
        connection.close()


def run_part(part: str, process_runs: list[list[dict]], context: dict, deadline: float, max_seeds: int,
             say) -> dict:
    """Starts one process per list of runs, collects their probes, chooses the plan, sends it and collects the
    results until `deadline` (processes still running a little after it are ended and their runs reported as
    unfinished)."""
    if deadline - time.time() < max(2.0, 0.02 * context["budget_seconds"]):  # not even the processes' start
        say(f"{part}: no time left; not run")
        return {"plan": None, "skipped": "no time left in the budget", "probes": [], "runs": [], "errors": [],
                "seconds": 0.0}
    spawn = multiprocessing.get_context(context["start_method"])
    barrier = spawn.Barrier(len(process_runs))
    context = dict(context, deadline=deadline)
    connections, processes = [], []
    for index, runs in enumerate(process_runs):
        parent_end, child_end = spawn.Pipe()
        process = spawn.Process(target=worker, args=(part, index, runs, context, child_end, barrier), daemon=True)
        process.start()
        child_end.close()
        connections.append(parent_end)
        processes.append(process)
    probes, results, errors, done = {}, [], {}, set()
    plan, planned_at = None, None
    grace = max(2.0, 0.02 * context["budget_seconds"])
    while len(done) < len(connections) and time.time() < deadline + grace:
        for connection in wait([c for i, c in enumerate(connections) if i not in done], timeout=0.5):
            index = connections.index(connection)
            try:
                kind, payload = connection.recv()
            except EOFError:
                done.add(index)
                errors.setdefault(index, "the process ended without a word (see its log)")
                continue
            if kind == "probe":
                probes[index] = RunCost(**payload)
            elif kind == "result":
                results.append(payload)
            elif kind == "error":
                errors[index] = payload
            elif kind == "done":
                done.add(index)
        waiting = [i for i in range(len(connections)) if i not in done and i not in probes]
        if plan is None and probes and not waiting:
            planned_at = time.time()
            workers = [[(run["seed"], probes[i]) for run in process_runs[i]] for i in sorted(probes)]
            plan = choose_plan(workers, deadline - planned_at, MIN_UPDATES[part], max_seeds)
            say(f"{part}: plan {plan.seeds} seeds x {plan.updates} updates per run "
                f"({'at least' if plan.enough else 'below'} the floor of {MIN_UPDATES[part]}) for the "
                f"{deadline - planned_at:.0f} s left of this part")
            for i in probes:
                if i not in done:
                    connections[i].send({**asdict(plan), "deadline": deadline})
    for index, process in enumerate(processes):
        if index not in done and process.is_alive():
            process.terminate()
            errors.setdefault(index, "still running at the part's deadline: ended")
    for process in processes:
        process.join(timeout=5)
    probe_table = [{"process": i, "runs": [run["name"] for run in process_runs[i]], **asdict(probes[i])}
                   for i in sorted(probes)]
    finished = {run["name"] for run in results}
    planned = [run["name"] for runs in process_runs for run in runs
               if plan and plan.updates and run["seed"] < plan.seeds]
    return {"plan": asdict(plan) if plan else None, "probes": probe_table, "runs": results,
            "errors": [{"process": i, "runs": [run["name"] for run in process_runs[i]], "error": error}
                       for i, error in sorted(errors.items())],
            "unfinished": [name for name in planned if name not in finished],
            "seconds": time.time() - context["part_started"]}


def cifar_runs(seeds: int) -> list[dict]:
    return [{"name": f"{variant} seed {seed}", "variant": variant, "seed": seed}
            for seed in range(seeds) for variant in CIFAR_VARIANTS]


def depth_runs(depths: list[int], seeds: int) -> list[dict]:
    return [{"name": f"{depth}+{depth} {regime} {variant} seed {seed}", "depth": depth, "regime": regime,
             "variant": variant, "seed": seed}
            for seed in range(seeds) for depth in depths for regime in REGIMES for variant in DEPTH_VARIANTS]


def costliest(runs: list[dict]) -> dict:
    """The run a process probes for all of its runs: the deepest, then the one with the most recursions."""
    def cost(run):
        options = {**CIFAR_VARIANTS, **DEPTH_VARIANTS}[run["variant"]]
        return run.get("depth", 0), options.get("skip_recursions", 1)

    return max(runs, key=cost)


def cifar_processes(seeds: int, parallel: int) -> list[list[dict]]:
    runs = cifar_runs(seeds)
    return spread(runs, min(parallel, len(runs)))


def depth_processes(depths: list[int], seeds: int, parallel: int) -> list[list[dict]]:
    """The depth map's runs, each process holding runs of one depth (so that one probe speaks for all its runs);
    processes shared out by depth, a run costing its number of layers."""
    runs = depth_runs(depths, seeds)
    counts = assign_workers({str(depth): (len(runs) // len(depths), depth) for depth in depths}, parallel)
    return [process for depth in depths
            for process in spread([run for run in runs if run["depth"] == depth], counts[str(depth)])]


# --------------------------------------------------------------------------------------------- the results

def cifar_summary(part: dict) -> list[dict]:
    rows = []
    runs = [run for run in part["runs"] if run.get("top1") is not None]
    plain = [run["top1"] for run in runs if run["variant"] == "plain"]
    post_ln = [run["top1"] for run in runs if run["variant"] == "post_ln"]
    for variant in CIFAR_VARIANTS:
        top1 = [run["top1"] for run in runs if run["variant"] == variant]
        rows.append({"variant": variant, "seeds": len(top1), "top1": top1, "top1_text": fmt(top1),
                     "binomial_error": mean_std([run["top1_error"] for run in runs if run["variant"] == variant])[0],
                     "loss_text": fmt([run["loss"] for run in runs if run["variant"] == variant], 3),
                     "against_plain": "—" if variant == "plain" else verdict(top1, plain),
                     "against_post_ln": verdict(top1, post_ln) if variant.startswith("rskip") else "—"})
    return rows


def depth_summary(part: dict, depths: list[int]) -> list[dict]:
    rows = []
    runs = part["runs"]
    for depth in depths:
        for regime in REGIMES:
            cell = {variant: [run for run in runs if (run["depth"], run["regime"], run["variant"])
                              == (depth, regime, variant)] for variant in DEPTH_VARIANTS}
            row = {"depth": depth, "regime": regime}
            for variant, cell_runs in cell.items():
                outcomes = [run["outcome"] for run in cell_runs]
                row[variant] = {
                    "exact_match": [run["exact_match"] for run in cell_runs],
                    "valid_loss": [run["valid_loss"] for run in cell_runs],
                    "outcomes": {name: outcomes.count(name) for name in ("trains", "stalls", "diverges")
                                 if name in outcomes}}
            rskip = row["rskip_ln K=2"]["exact_match"]
            row["rskip_vs_post_ln"] = verdict(rskip, row["post_ln"]["exact_match"])
            row["rskip_vs_pre_ln"] = verdict(rskip, row["pre_ln"]["exact_match"])
            rows.append(row)
    return rows


def describe_outcomes(outcomes: dict) -> str:
    return ", ".join(f"{name} {count}" for name, count in outcomes.items()) or "no run"


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# GPU evidence", "",
             f"{results['device']}; budget {results['budget_minutes']} min, finished after "
             f"{results['elapsed_seconds']:.0f} s (install included). Versions: {results['versions']}.", "",
             "Rules: mean ± std over seeds; a difference within the larger standard deviation is *no difference*; "
             "the schedule's length was chosen from timings alone, and no test split was looked at before the end.",
             ""]
    cifar = results["cifar"]
    lines += ["## CIFAR-10, " + results["settings"]["cifar_model"], ""]
    if cifar.get("plan") and cifar["plan"]["updates"]:
        plan = cifar["plan"]
        lines += [f"{plan['seeds']} seeds x {plan['updates']} updates of {results['settings']['batch_size']} images "
                  f"({plan['updates'] * results['settings']['batch_size'] / max(1, cifar['train_images']):.1f} "
                  f"epochs of {cifar['train_images']} images); validation: the last {cifar['validation_images']} "
                  "training images." + ("" if plan["enough"] else
                                        f" **Below the floor of {MIN_UPDATES['cifar']} updates: too short to be "
                                        "evidence.**"), "",
                  "| variant | seeds | validation top-1 (%) | binomial error of one run | validation loss | "
                  "against plain | against post_ln |", "|---|---|---|---|---|---|---|"]
        for row in cifar["summary"]:
            error = "—" if math.isnan(row["binomial_error"]) else f"± {row['binomial_error']:.2f}"
            lines.append(f"| {row['variant']} | {row['seeds']} | {row['top1_text']} | {error} | "
                         f"{row['loss_text']} | {row['against_plain']} | {row['against_post_ln']} |")
    else:
        lines.append("Not run: " + not_run(cifar))
    lines += notes_of(cifar)
    depth = results["depth_map"]
    width = results["settings"]["width"]
    lines += ["", f"## Depth map, width {width['d_model']} (FFN {width['ffn_dim']}, {width['heads']} heads)", ""]
    if depth.get("plan") and depth["plan"]["updates"]:
        plan = depth["plan"]
        lines += [f"{plan['seeds']} seeds x {plan['updates']} updates of at most {TOKENS_PER_BATCH} tokens."
                  + ("" if plan["enough"] else f" **Below the floor of {MIN_UPDATES['depth']} updates: too short "
                                                "to be evidence.**"),
                  f"Outcomes: diverges (non-finite loss, or final validation loss above ln(vocab) + 1 = "
                  f"{depth['divergence_loss']:.2f}), trains (at least {TRAINS_AT_EXACT_MATCH:g} % of the test "
                  f"numbers exactly right), stalls (fewer; for scale, the unigram loss is "
                  f"{depth['unigram_loss']:.2f}).", "",
                  "| depth | regime | " + " | ".join(f"{v} exact match (%) | {v} valid loss | {v} outcomes"
                                                     for v in DEPTH_VARIANTS) + " | rskip_ln vs post_ln | "
                  "rskip_ln vs pre_ln |", "|---|---|" + "---|---|---|" * len(DEPTH_VARIANTS) + "---|---|"]
        for row in depth["summary"]:
            cells = " | ".join(f"{fmt(row[v]['exact_match'], 1)} | {fmt(row[v]['valid_loss'], 3)} | "
                               f"{describe_outcomes(row[v]['outcomes'])}" for v in DEPTH_VARIANTS)
            lines.append(f"| {row['depth']}+{row['depth']} | {row['regime']} | {cells} | {row['rskip_vs_post_ln']} | "
                         f"{row['rskip_vs_pre_ln']} |")
    else:
        lines.append("Not run: " + not_run(depth))
    lines += notes_of(depth)
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    path.write_text("\n".join(lines) + "\n")


def not_run(part: dict) -> str:
    if part.get("skipped"):
        return part["skipped"]
    if part.get("plan"):
        return "after the probe, not one update fitted in the part's time."
    return "no process reached the probe (see below and logs/)."


def notes_of(part: dict) -> list[str]:
    lines = [f"- {name}: planned, but not finished within the budget" for name in part.get("unfinished", [])]
    for error in part.get("errors", []):
        lines.append(f"- process {error['process']} ({', '.join(error['runs'])}): **{error['error']}**")
    for run in part.get("runs", []):
        if run.get("stopped"):
            lines.append(f"- {run['name']}: {run['stopped']}")
    return [""] + lines if lines else []


def plotting():
    """matplotlib's pyplot (Agg), imported before the runs so that its import counts before the plan is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(results: dict, folder: Path) -> list[str]:
    """The PNGs; returns their names."""
    plt = plotting()

    drawn = []
    cifar = results["cifar"]
    if cifar.get("summary"):
        figure, axes = plt.subplots(figsize=(6, 4))
        for position, row in enumerate(cifar["summary"]):
            if row["top1"]:
                mean, std = mean_std(row["top1"])
                axes.bar(position, mean, yerr=std, color="#9ab", capsize=4)
                axes.plot([position] * len(row["top1"]), row["top1"], "k.", zorder=3)
        axes.set_xticks(range(len(cifar["summary"])), [row["variant"] for row in cifar["summary"]])
        values = [value for row in cifar["summary"] for value in row["top1"]]
        if values:
            axes.set_ylim(max(0, min(values) - 5), min(100, max(values) + 2))
        axes.set_ylabel("validation top-1 (%)")
        axes.set_title(f"CIFAR-10 {results['settings']['cifar_model']}: mean ± std and seeds")
        figure.tight_layout()
        figure.savefig(folder / "cifar_top1.png", dpi=120)
        plt.close(figure)
        figure, axes = plt.subplots(figsize=(6, 4))
        colours = dict(zip(CIFAR_VARIANTS, ("C0", "C1", "C2", "C3")))
        for run in cifar["runs"]:
            if run.get("training_loss"):
                updates, losses = zip(*run["training_loss"])
                axes.plot(updates, losses, color=colours[run["variant"]], alpha=0.7,
                          label=run["variant"] if run["seed"] == 0 else None)
        axes.set_xlabel("update")
        axes.set_ylabel("training loss")
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        figure.tight_layout()
        figure.savefig(folder / "cifar_training_loss.png", dpi=120)
        plt.close(figure)
        drawn += ["cifar_top1.png", "cifar_training_loss.png"]
    depth = results["depth_map"]
    if depth.get("summary"):
        rows = depth["summary"]
        figure, axes = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
        grid = [[mean_std(row[v]["exact_match"])[0] for v in DEPTH_VARIANTS] for row in rows]
        axes.imshow([[0 if math.isnan(value) else value for value in line] for line in grid], cmap="viridis",
                    vmin=0, vmax=100, aspect="auto")
        for y, row in enumerate(rows):
            for x, variant in enumerate(DEPTH_VARIANTS):
                text = f"{fmt(row[variant]['exact_match'], 0)}\n{describe_outcomes(row[variant]['outcomes'])}"
                axes.text(x, y, text, ha="center", va="center", fontsize=7, color="white")
        axes.set_xticks(range(len(DEPTH_VARIANTS)), list(DEPTH_VARIANTS))
        axes.set_yticks(range(len(rows)), [f"{row['depth']}+{row['depth']} {row['regime']}" for row in rows])
        axes.set_title("depth map: test exact match (%) and outcomes")
        figure.tight_layout()
        figure.savefig(folder / "depth_map.png", dpi=120)
        plt.close(figure)
        drawn.append("depth_map.png")
    return drawn


def library_versions() -> str:
    versions = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for name in ("transformers", "timm", "torchvision", "tokenizers"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    return ", ".join(versions)


def device_description(device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores"
    return f"CPU only ({os.cpu_count()} cores): no GPU figure is measured here"


# ------------------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict | None:
    args = parse_args(argv)
    output = Path(args.output_dir)
    if args.replot:
        results_file = output / "results.json"
        if not results_file.is_file():
            sys.exit(f"gpu_evidence: no {results_file} to draw from")
        print("drew", ", ".join(draw(json.loads(results_file.read_text()), output)))
        return None
    started = args.started or time.time()
    try:
        manifest = check_carry(Path(args.carry))
    except CarryError as error:
        sys.exit(f"gpu_evidence: {error}")
    if args.validation_images >= manifest["cifar10"]["images"]:
        sys.exit(f"gpu_evidence: --validation_images {args.validation_images} leaves no training image of the "
                 f"{manifest['cifar10']['images']} carried")
    output.mkdir(parents=True, exist_ok=True)
    (output / "logs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as scratch:  # the decoded images: 150 MB
        return run_evidence(args, manifest, started, output, Path(scratch))


def run_evidence(args, manifest: dict, started: float, output: Path, scratch: Path) -> dict:
    budget = args.budget_minutes * 60
    finish_by = started + budget - max(RESERVE_SECONDS, RESERVE_FRACTION * budget)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def say(line: str):
        print(f"[{time.time() - started:6.1f} s] {line}", flush=True)

    method = start_method(device)
    try:
        plotting()
        no_plots = None
    except ImportError as error:
        no_plots = (f"no PNGs here ({error}); draw them where matplotlib is installed: python -m "
                    f"rskip.experiments.gpu_evidence {output} --replot")
    say(f"carry checked ({manifest['cifar10']['images']} images); device {device}")
    cifar_data = decode_cifar(Path(args.carry), scratch / "cifar10-decoded.pt")
    say(f"decoded {cifar_data['images']} images")
    width = {"d_model": args.d_model, "ffn_dim": args.ffn_dim, "heads": args.heads}
    context = {"output_dir": str(output), "carry": str(Path(args.carry).resolve()), "device": str(device),
               "decoded": str(scratch / "cifar10-decoded.pt"), "validation_images": args.validation_images,
               "batch_size": args.batch_size, "cifar_model": args.cifar_model, "width": width,
               "probe_updates": args.probe_updates, "budget_seconds": budget, "start_method": method,
               "threads": 1 if device.type == "cpu" else max(1, (os.cpu_count() or 1) // args.parallel)}
    results = {"budget_minutes": args.budget_minutes, "device": device_description(device),
               "versions": library_versions(), "carry": {key: manifest[key] for key in ("cifar10", "numbers")},
               "settings": {"cifar_model": args.cifar_model, "batch_size": args.batch_size, "width": width,
                            "depths": args.depths, "max_seeds": args.seeds, "parallel": args.parallel,
                            "cifar_share": args.cifar_share, "probe_updates": args.probe_updates},
               "notes": []}

    cifar_deadline = time.time() + args.cifar_share * (finish_by - time.time())
    say(f"CIFAR part until {cifar_deadline - started:.0f} s")
    cifar = run_part("cifar", cifar_processes(args.seeds, args.parallel), dict(context, part_started=time.time()),
                     cifar_deadline, args.seeds, say)
    cifar.update(summary=cifar_summary(cifar), train_images=cifar_data["images"] - args.validation_images,
                 validation_images=args.validation_images)
    results["cifar"] = cifar

    say(f"depth map until {finish_by - started:.0f} s")
    depth = run_part("depth", depth_processes(args.depths, args.seeds, args.parallel),
                     dict(context, part_started=time.time()), finish_by, args.seeds, say)
    vocabulary = manifest["numbers"]["vocab_size"]
    depth.update(summary=depth_summary(depth, args.depths), divergence_loss=math.log(vocabulary) + 1,
                 unigram_loss=next((run["unigram_loss"] for run in depth["runs"]), float("nan")))
    results["depth_map"] = depth

    results["plots"] = [] if no_plots else draw(results, output)
    if no_plots:
        results["notes"].append(no_plots)
    if device.type != "cuda":
        results["notes"].append("Run on the CPU: no figure here is a GPU measurement.")
    results["elapsed_seconds"] = time.time() - started
    (output / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, output / "results.md")
    say(f"results in {output} after {results['elapsed_seconds']:.0f} s of the {budget:.0f} s budget")
    return results


if __name__ == "__main__":
    # The runs' processes must find `worker` in this module under its own name, not `__main__`.
    from rskip.experiments.gpu_evidence import main as package_main

    package_main()
