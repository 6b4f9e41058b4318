"""Speed and memory of the residual variants, as ratios against the stock model measured in the same run.

    python scripts/benchmark.py --family marian --d_model 256 --layers 3 --batch_size 32 --seq_len 32
    python scripts/benchmark.py --family resnet --image_model resnet50 --batch_size 8 --image_size 64

For each model: one training step (forward + backward) timed with `torch.utils.benchmark` (the median of
several rounds that visit every model in turn), the
activation memory kept for the backward pass (bytes of the tensors autograd saves, counted once per
storage; device-independent), peak CUDA memory when on a GPU, and the parameter count. Writes
`benchmark.json`, `benchmark.csv` and `benchmark.png` to `--output_dir`.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.utils.benchmark as torch_benchmark  # noqa: E402
from transformers import MarianConfig, MarianMTModel  # noqa: E402

import rskip  # noqa: E402

MARIAN_VARIANTS = [
    dict(skip_variant="post_ln"),
    dict(skip_variant="pre_ln"),
    dict(skip_variant="xskip_ln", skip_scale=2.0),
    dict(skip_variant="rskip_ln", skip_recursions=2),
    dict(skip_variant="rskip_ln", skip_recursions=3),
    dict(skip_variant="rskip_bn", skip_recursions=2),
]
RESNET_VARIANTS = [
    dict(skip_variant="plain"),
    dict(skip_variant="post_ln"),
    dict(skip_variant="rskip_ln", skip_recursions=2),
    dict(skip_variant="rskip_ln", skip_recursions=2, skip_norm_dims="c"),
    dict(skip_variant="rskip_bn", skip_recursions=2),
]


def label(options: dict) -> str:
    return " ".join(f"{key.removeprefix('skip_')}={value}" for key, value in options.items())


def saved_activation_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass during one forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return sum(storages.values())


def profile(name: str, model: torch.nn.Module, make_loss, args) -> tuple[dict, callable]:
    """The model's parameter count and memory, and its training step for timing."""
    model.to(args.device).train()

    def step():
        model.zero_grad(set_to_none=True)
        return make_loss(model)

    def train_step():
        step().backward()

    train_step()  # warm-up
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step()
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    result["activation_bytes"] = saved_activation_bytes(step)
    return result, train_step


def time_steps(results: list[dict], train_steps: list, args) -> None:
    """Median step time of each model over `--rounds` rounds that visit every model in turn, so that a machine
    slowing down or speeding up during the run affects all models alike."""
    rounds = [[] for _ in results]
    for round_index in range(args.rounds):
        for times, train_step in zip(rounds, train_steps):
            timer = torch_benchmark.Timer(stmt="train_step()", globals={"train_step": train_step},
                                          num_threads=args.threads)
            times.append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
        print(f"  round {round_index + 1}/{args.rounds}", flush=True)
    for result, times in zip(results, rounds):
        result["step_seconds"] = statistics.median(times)


def marian_models(args):
    shape = dict(vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=args.layers,
                 decoder_layers=args.layers, encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                 encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model,
                 pad_token_id=args.vocab_size - 1, decoder_start_token_id=args.vocab_size - 1)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab_size - 1, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.randint(0, args.vocab_size - 1, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": input_ids.to(args.device), "labels": labels.to(args.device)}

    def make_loss(model):
        return model(**batch).loss

    yield "MarianMTModel (stock)", MarianMTModel(MarianConfig(**shape)), make_loss
    for options in MARIAN_VARIANTS:
        yield f"RSkipMarian {label(options)}", rskip.RSkipMarianMTModel(rskip.RSkipMarianConfig(**shape, **options)), \
            make_loss


def resnet_models(args):
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0)).to(args.device)

    def make_loss(model):
        return model(images).logsumexp(-1).mean()

    yield f"timm {args.image_model} (stock)", timm.create_model(args.image_model), make_loss
    for options in RESNET_VARIANTS:
        yield f"rskip_{args.image_model} {label(options)}", timm.create_model(f"rskip_{args.image_model}", **options), \
            make_loss


def plot(results, path: Path, title: str) -> None:
    names = [r["model"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 1.5), sharey=True)
    for ax, key, xlabel in zip(axes, ("time_ratio", "activation_ratio"),
                               ("step time / stock", "activation memory / stock")):
        ax.barh(names, [r[key] for r in results], color=["grey"] + ["tab:blue"] * (len(names) - 1))
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("marian", "resnet"), default="marian")
    parser.add_argument("--output_dir", default="runs/benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min_run_time", type=float, default=1.0, help="seconds of timing per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; each model's median is reported")
    parser.add_argument("--batch_size", type=int, default=16)
    group = parser.add_argument_group("marian")
    group.add_argument("--vocab_size", type=int, default=8000)
    group.add_argument("--d_model", type=int, default=256)
    group.add_argument("--heads", type=int, default=4)
    group.add_argument("--layers", type=int, default=3)
    group.add_argument("--seq_len", type=int, default=32)
    group = parser.add_argument_group("resnet")
    group.add_argument("--image_model", choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
                       default="resnet50")
    group.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        parser.error(f"--d_model {args.d_model} must be divisible by --heads {args.heads}")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"benchmark: {args.family} on {args.device}, {args.threads} threads", flush=True)
    models = marian_models(args) if args.family == "marian" else resnet_models(args)
    results, train_steps = zip(*(profile(name, model, make_loss, args) for name, model, make_loss in models))
    time_steps(results, train_steps, args)
    stock = results[0]
    for result in results:
        result["time_ratio"] = result["step_seconds"] / stock["step_seconds"]
        result["activation_ratio"] = result["activation_bytes"] / stock["activation_bytes"]
        if "peak_cuda_bytes" in result:
            result["peak_cuda_ratio"] = result["peak_cuda_bytes"] / stock["peak_cuda_bytes"]

    print(f"\n{'model':<55} {'params':>10} {'ms/step':>9} {'time×':>7} {'act. MiB':>9} {'act.×':>7}")
    for r in results:
        print(f"{r['model']:<55} {r['parameters']:>10,} {r['step_seconds'] * 1e3:>9.1f} {r['time_ratio']:>7.3f} "
              f"{r['activation_bytes'] / 2**20:>9.1f} {r['activation_ratio']:>7.3f}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    with open(output_dir / "benchmark.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    plot(results, output_dir / "benchmark.png", f"{args.family} on {args.device}, batch {args.batch_size}")
    print(f"\nwrote {output_dir}/benchmark.{{json,csv,png}}")
    return list(results)


if __name__ == "__main__":
    main()
