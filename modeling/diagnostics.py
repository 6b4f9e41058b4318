"""Diagnostics of the residual family: per-layer gradient norms and the output change under a parameter update.

Two measures, for any model of this package and for stock Marian and timm ResNets, at initialisation or at any
point of a run (`rskip-train-* --diagnostics_steps 0,100`):

- **Gradient norms** per residual sublayer: the L2 norm of the loss gradient over the parameters of each layer's
  sublayers (Marian: `self_attn`, `cross_attn` and `ffn` of every encoder and decoder layer, each with its skip/norm;
  ResNets: every block). Without a norm, a stack of `xskip` blocks scales the gradient reaching block i by
  λ^(depth above i) (Liu et al., COLING 2020); the norm after the add divides that scale back out.
- **Output change** ‖f(x; θ) − f(x; θ + δ)‖, the measure of Liu et al. 2020 ("Understanding the Difficulty of
  Training Transformers", EMNLP), with δ one update: by default Adam's first step, δ = −η·g/(|g| + ε), whose size
  does not depend on the gradient's scale, which is why a post-LN stack that amplifies a small change of every
  layer is unstable under Adam. ``perturbation="random"`` uses Gaussian noise of relative size η per tensor instead.

    from rskip.diagnostics import measure, random_batch, plot_layers
    model = AutoModelForSeq2SeqLM.from_pretrained("runs/m30k")         # or timm.create_model("resnet50")
    report = measure(model, random_batch(model))                      # or a batch of your data, with "labels"
    report["gradient_ratio"]           # first layer's gradient norm / last layer's, per stack
    report["output_change"]            # RMS of f(x; θ + δ) − f(x; θ) over the outputs (logits)
    plot_layers({"my model": report}, "gradients.png")

Dropout is off while measuring; BatchNorm normalises with the batch's statistics (as in training), and its running
statistics are left as they were. The model's parameters, gradients and training mode are restored afterwards.
"""

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Parameter names -> (stack, layer index, sublayer). Marian's sublayer parameters are the attention or FFN weights
# and the skip (norm) that joins them; a ResNet block is one residual sublayer.
MARIAN_SUBLAYERS = {"self_attn": "self_attn", "self_attn_layer_norm": "self_attn", "encoder_attn": "cross_attn",
                    "encoder_attn_layer_norm": "cross_attn", "fc1": "ffn", "fc2": "ffn", "final_layer_norm": "ffn"}
LAYER_PATTERNS = (
    re.compile(r"(?:^|\.)(?P<stack>encoder|decoder)\.layers\.(?P<index>\d+)\.(?P<sublayer>[a-z_0-9]+)(?:\.|$)"),
    re.compile(r"(?:^|\.)stages\.(?P<stage>\d+)\.blocks\.(?P<index>\d+)\."),  # CIFAR PreAct-ResNets, ResNetV2
    re.compile(r"(?:^|\.)layer(?P<stage>\d)\.(?P<index>\d+)\."),  # timm's ResNet
    re.compile(r"(?:^|\.)layers\.(?P<index>\d+)\."),  # any other stack of numbered layers
)


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(stack, position, sublayer) of a parameter name, or None for parameters outside the residual stack
    (embeddings, stem, head). ResNet blocks are numbered across stages, so position is the depth of the block."""
    for pattern in LAYER_PATTERNS:
        match = pattern.search(name)
        if match:
            groups = match.groupdict()
            if "sublayer" in groups:
                sublayer = MARIAN_SUBLAYERS.get(groups["sublayer"])
                return (groups["stack"], int(groups["index"]), sublayer) if sublayer else None
            stage = int(groups.get("stage") or 0)
            return "blocks", stage * 10_000 + int(groups["index"]), "block"
    return None


def _groups(model: nn.Module, key: Callable[[str], tuple | None]) -> dict[tuple, list[nn.Parameter]]:
    groups: dict[tuple, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and (group := key(name)) is not None:
            groups.setdefault(group, []).append(parameter)
    return dict(sorted(groups.items(), key=lambda item: _position_key(item[0])))


STACK_ORDER = {"encoder": 0, "decoder": 1}
SUBLAYER_ORDER = {"self_attn": 0, "cross_attn": 1, "ffn": 2}


def _position_key(group: tuple) -> tuple:
    stack, index, sublayer = group
    return STACK_ORDER.get(stack, 2), stack, index, SUBLAYER_ORDER.get(sublayer, 3)


def default_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, outputs) of a batch: Hugging Face models get the batch as keyword arguments and return their loss and
    logits; any other module (timm) gets `batch["pixel_values"]` and a cross-entropy against `batch["labels"]`."""
    if hasattr(model, "config") and hasattr(model, "can_generate"):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs).logits
    else:
        logits = model(batch["pixel_values"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
    return loss, logits


def random_batch(model: nn.Module, batch_size: int = 8, length: int = 16, image_size: int | None = None,
                 seed: int = 0) -> dict:
    """A batch of random inputs and labels for `model`: token ids for a Marian model (sources and targets of
    `length` tokens), images for a ResNet (`image_size`, default the model's input size)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size") and hasattr(config, "decoder_start_token_id"):
        special = 3  # leave out the special tokens (eos, unk, pad) at the start of a SentencePiece vocabulary
        ids = torch.randint(special, config.vocab_size, (2, batch_size, length), generator=generator)
        decoder_input_ids = torch.cat([torch.full((batch_size, 1), config.decoder_start_token_id), ids[1, :, :-1]], 1)
        batch = {"input_ids": ids[0], "attention_mask": torch.ones_like(ids[0]),
                 "decoder_input_ids": decoder_input_ids, "labels": ids[1]}
    else:
        timm_model = getattr(model, "timm_model", model)
        channels, height, width = getattr(timm_model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        size = (image_size, image_size) if image_size else (height, width)
        num_classes = getattr(timm_model, "num_classes", 10)
        batch = {"pixel_values": torch.randn(batch_size, channels, *size, generator=generator),
                 "labels": torch.randint(0, num_classes, (batch_size,), generator=generator)}
    return {key: value.to(device) for key, value in batch.items()}


class _MeasuringMode:
    """Dropout off, BatchNorm on batch statistics with its running statistics restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.buffers = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in self.norms]
        for norm in self.norms:
            norm.train()

    def __exit__(self, *exc):
        for norm, buffers in zip(self.norms, self.buffers):
            for key, value in buffers.items():
                getattr(norm, key).copy_(value)
        self.model.train(self.was_training)


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(t.detach().double().pow(2).sum().item() for t in tensors))


def measure(model: nn.Module, batch: dict, loss_fn: Callable = default_loss, perturbation: str = "adam",
            step_size: float = 1e-3, layer_key: Callable[[str], tuple | None] = layer_of, seed: int = 0) -> dict:
    """Per-sublayer gradient norms of `loss_fn(model, batch)` and the output change under one update δ.

    Returns a dict: `layers` (one record per sublayer: stack, index, sublayer, grad_norm, param_norm), `stacks`
    (per stack: its sublayer gradient norms in order, `gradient_ratio` = first / last), `gradient_ratio` (the
    first stack's), `loss`, and `output_change` / `relative_output_change` (RMS of f(x; θ+δ) − f(x; θ), and that
    divided by the RMS of f(x; θ)). `perturbation`: "adam" (δ = −η·g/(|g| + 1e-8), Adam's first update with
    learning rate η = `step_size`) or "random" (δ = η·‖p‖/√n · N(0, 1) per tensor p of n entries).
    """
    if perturbation not in ("adam", "random"):
        raise ValueError(f"perturbation={perturbation!r} is not allowed; allowed: 'adam', 'random'")
    parameters = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in parameters]
    with _MeasuringMode(model):
        for p in parameters:
            p.grad = None
        loss, outputs = loss_fn(model, batch)
        loss.backward()
        groups = _groups(model, layer_key)
        records = []
        for (stack, index, sublayer), group in groups.items():
            grads = [p.grad for p in group if p.grad is not None]
            records.append({"stack": stack, "index": index, "sublayer": sublayer,
                            "grad_norm": _norm(grads) if grads else 0.0, "param_norm": _norm(group)})

        # Output change under one update of every parameter, restored afterwards.
        generator = torch.Generator().manual_seed(seed)
        originals = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            for p in parameters:
                if perturbation == "adam":
                    if p.grad is not None:
                        p -= step_size * p.grad / (p.grad.abs() + 1e-8)
                else:
                    noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
                    p += step_size * p.norm() / math.sqrt(p.numel()) * noise
            _, perturbed = loss_fn(model, batch)
            for p, original in zip(parameters, originals):
                p.copy_(original)
        difference = (perturbed.double() - outputs.detach().double())
        change = difference.pow(2).mean().sqrt().item()
        scale = outputs.detach().double().pow(2).mean().sqrt().item()
    for p, grad in zip(parameters, saved_grads):
        p.grad = grad

    stacks = {}
    for record in records:
        stacks.setdefault(record["stack"], []).append(record["grad_norm"])
    stack_summary = {name: {"grad_norms": norms, "gradient_ratio": _ratio(norms[0], norms[-1])}
                     for name, norms in stacks.items()}
    for stack_name in stacks:  # renumber positions 0..n-1 within each stack, in order (ResNet blocks span stages)
        for position, record in enumerate(r for r in records if r["stack"] == stack_name):
            record["position"] = position
    return {
        "loss": loss.item(),
        "layers": records,
        "stacks": stack_summary,
        "gradient_ratio": next(iter(stack_summary.values()))["gradient_ratio"] if stack_summary else float("nan"),
        "output_change": change,
        "relative_output_change": change / scale if scale else float("nan"),
        "perturbation": perturbation,
        "step_size": step_size,
    }


def _ratio(first: float, last: float) -> float:
    if not (math.isfinite(first) and math.isfinite(last)):
        return float("nan")
    return first / last if last else float("inf")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(reports: dict[str, dict], path: str | Path, title: str | None = None) -> Path:
    """Gradient norm against sublayer position, one panel per stack, one line per report (log scale)."""
    plt = _pyplot()
    stacks = list(dict.fromkeys(record["stack"] for report in reports.values() for record in report["layers"]))
    figure, axes = plt.subplots(1, max(len(stacks), 1), figsize=(5.5 * max(len(stacks), 1), 4), squeeze=False)
    for axis, stack in zip(axes[0], stacks):
        for label, report in reports.items():
            points = [(r["position"], r["grad_norm"]) for r in report["layers"]
                      if r["stack"] == stack and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=2, label=label)
        axis.set_yscale("log")
        axis.set_xlabel(f"{stack} sublayer (input side first)")
        axis.set_ylabel("gradient norm")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def plot_by_depth(series: dict[str, dict[int, float]], path: str | Path, ylabel: str, title: str | None = None,
                  log: bool = True) -> Path:
    """A measure (first/last gradient ratio, output change...) against depth, one line per variant."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for label, values in series.items():
        points = sorted((depth, value) for depth, value in values.items() if math.isfinite(value) and value > 0)
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    if log:
        axis.set_yscale("log")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("depth (layers)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


__all__ = [
    "LAYER_PATTERNS",
    "layer_of",
    "default_loss",
    "random_batch",
    "measure",
    "plot_layers",
    "plot_by_depth",
]
