"""Speed and memory of the residual variants, as ratios against the stock model measured in the same run.

    rskip-benchmark --family marian --preset small --batch_size 32 --seq_len 24
    rskip-benchmark --family marian --preset base --batch_size 16 --seq_len 24
    rskip-benchmark --family resnet --image_model resnet50 --batch_size 8 --image_size 64
    rskip-benchmark --family resnet --image_model preact_resnet110 --batch_size 32 --image_size 32

Each LN variant runs twice: through the fused op (the default, "fused") and through the loop of norm modules
("reference", `rskip.use_fused_skip(False)`). For each model: one training step (forward + backward) and one
inference call (beam-4 `generate` of `--seq_len` new tokens for Marian, a forward pass for images), timed with
`torch.utils.benchmark` (the median of several rounds that visit every model in turn); the activation memory kept for
the backward pass (bytes of the tensors autograd saves, counted once per storage; device-independent), peak CUDA
memory of a training step on a GPU, and the parameter count. `--compile` adds `torch.compile`d copies of the stock
model and of the K = 2 rows. On CUDA the models run under bf16 autocast. Writes `benchmark.json`, `benchmark.csv` and
`benchmark.png` to `--output_dir`.
"""

import argparse
import contextlib
import copy
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
from rskip.command_line import COUNT, POSITIVE, CommandParser, bounded, output_folder  # noqa: E402

MARIAN_VARIANTS = [
    dict(skip_variant="post_ln"),
    dict(skip_variant="rskip_ln", skip_recursions=2),
    dict(skip_variant="rskip_ln", skip_recursions=3),
    dict(skip_variant="xskip_ln", skip_scale=2.0),
    dict(skip_variant="pre_ln"),
    dict(skip_variant="rskip_bn", skip_recursions=2),
]
RESNET_VARIANTS = [
    dict(skip_variant="plain"),
    dict(skip_variant="post_ln"),
    dict(skip_variant="rskip_ln", skip_recursions=2),
    dict(skip_variant="rskip_ln", skip_recursions=3),
    dict(skip_variant="rskip_ln", skip_recursions=2, skip_norm_dims="c"),
    dict(skip_variant="rskip_bn", skip_recursions=2),
]
MARIAN_PRESETS = {  # transformer-small (as in the paper's IWSLT runs, scaled to CPU) and transformer-base
    "small": dict(d_model=256, layers=3, heads=4),
    "base": dict(d_model=512, layers=6, heads=8),
}
FUSED_VARIANTS = ("post_ln", "xskip_ln", "rskip_ln")  # the variants whose LayerNorm forms run through the op


def label(options: dict, fused: bool | None = None, compiled: bool = False) -> str:
    """A row's name after its model: the skip options (`SkipOptions.label`), the path (fused op or reference loop),
    compiled or not."""
    name = rskip.ResNetSkipOptions(**options).label()
    if fused is not None:
        name += " fused" if fused else " reference"
    return name + (" compiled" if compiled else "")


def paths(options: dict) -> list[bool | None]:
    return [True, False] if options["skip_variant"] in FUSED_VARIANTS else [None]


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


def autocast(args):
    """bf16 autocast on CUDA (the GPU benchmark's precision); full precision on CPU."""
    if args.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def skip_path(fused: bool | None):
    return contextlib.nullcontext() if fused is None else rskip.use_fused_skip(fused)


def profile(name: str, model: torch.nn.Module, make_loss, infer, fused, compiled, args) -> tuple[dict, tuple]:
    """The model's parameter count and memory, and its training step and inference call for timing."""
    model.to(args.device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compiled else model

    def step():
        model.zero_grad(set_to_none=True)
        with skip_path(fused), autocast(args):
            return make_loss(runner)

    def train_step():
        step().backward()

    def infer_step():
        model.eval()
        with torch.no_grad(), skip_path(fused), autocast(args):
            infer(runner)
        model.train()

    train_step()  # warm-up (and compilation)
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step()
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    result["activation_bytes"] = saved_activation_bytes(step)
    if infer is None:
        return result, (train_step, None)
    infer_step()
    return result, (train_step, infer_step)


def time_steps(results: list[dict], steps: list, args) -> None:
    """Median time of each model's training step and inference call over `--rounds` rounds that visit every model in
    turn, so that a machine slowing down or speeding up during the run affects all models alike."""
    rounds = [([], []) for _ in results]
    for round_index in range(args.rounds):
        for times, model_steps in zip(rounds, steps):
            for kind_times, fn in zip(times, model_steps):
                if fn is not None:
                    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=args.threads)
                    kind_times.append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
        print(f"  round {round_index + 1}/{args.rounds}", flush=True)
    for result, (train_times, infer_times) in zip(results, rounds):
        result["step_seconds"] = statistics.median(train_times)
        result["infer_seconds"] = statistics.median(infer_times) if infer_times else None


def variant_rows(stock_name, stock_model, prefix, build, variants, args):
    """(name, model, fused, compiled): the stock model, then each variant on each of its paths; `--compile` adds
    compiled copies of the stock model and of the K = 2 rows."""
    yield stock_name, stock_model, None, False
    if args.compile:
        yield f"{stock_name} compiled", copy.deepcopy(stock_model), None, True
    for options in variants:
        for fused in paths(options):
            yield f"{prefix} {label(options, fused)}", build(options), fused, False
            if args.compile and options.get("skip_recursions") == 2 and "skip_norm_dims" not in options:
                yield f"{prefix} {label(options, fused, compiled=True)}", build(options), fused, True


def marian_models(args):
    shape = dict(vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=args.layers,
                 decoder_layers=args.layers, encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                 encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model,
                 pad_token_id=args.vocab_size - 1, decoder_start_token_id=args.vocab_size - 1,
                 eos_token_id=args.vocab_size - 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab_size - 2, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.randint(0, args.vocab_size - 2, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": input_ids.to(args.device), "labels": labels.to(args.device)}
    sources = batch["input_ids"][:args.generate_batch_size]

    def make_loss(model):
        return model(**batch).loss

    def translate(model):
        # every model writes exactly --seq_len tokens per beam, so all do the same work
        model.generate(sources, num_beams=4, max_new_tokens=args.seq_len, min_new_tokens=args.seq_len)

    def build(options):
        return rskip.RSkipMarianMTModel(rskip.RSkipMarianConfig(**shape, **options))

    for name, model, fused, compiled in variant_rows(
            "MarianMTModel (stock)", MarianMTModel(MarianConfig(**shape)), "RSkipMarian", build,
            selected_variants(MARIAN_VARIANTS, args), args):
        # generate() goes around a compiled module's forward: compiled rows report training only
        yield name, model, make_loss, None if compiled else (lambda runner, m=model: translate(m)), fused, compiled


def resnet_models(args):
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0)).to(args.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def make_loss(model):
        return model(images).logsumexp(-1).mean()

    def forward(model):
        model(images)

    if args.image_model.startswith("preact_"):  # no stock timm model: rskip's `plain` is the He et al. network
        stock_name, stock = f"{args.image_model} plain (stock)", timm.create_model(args.image_model, skip_variant="plain")
        variants = [options for options in RESNET_VARIANTS if options["skip_variant"] != "plain"]
    else:
        stock_name, stock = f"timm {args.image_model} (stock)", timm.create_model(args.image_model)
        variants = RESNET_VARIANTS
    model_name = args.image_model if args.image_model.startswith("preact_") else f"rskip_{args.image_model}"
    for name, model, fused, compiled in variant_rows(
            stock_name, stock, model_name, lambda options: timm.create_model(model_name, **options),
            selected_variants(variants, args), args):
        yield name, model, make_loss, forward, fused, compiled


def plot(results, path: Path, title: str) -> None:
    names = [r["model"] for r in results]
    panels = [("time_ratio", "training step / stock"), ("infer_ratio", "inference / stock"),
              ("activation_ratio", "activation memory / stock")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.4 * len(names) + 1.5), sharey=True)
    for ax, (key, xlabel) in zip(axes, panels):
        colors = ["grey" if "stock" in n else "tab:orange" if "reference" in n else "tab:blue" for n in names]
        ax.barh(names, [r.get(key) or 0.0 for r in results], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# The op alone ---------------------------------------------------------------------------------------------------------


def copy_bandwidth(args) -> float:
    """The device's measured copy bandwidth in bytes/s (read + write), the ceiling of a memory-bound op."""
    elements = (2**29 if args.device.startswith("cuda") else 2**24) // 2
    source = torch.empty(elements, dtype=torch.bfloat16, device=args.device).normal_()
    target = torch.empty_like(source)
    timer = torch_benchmark.Timer(stmt="target.copy_(source)", globals={"target": target, "source": source},
                                  num_threads=args.threads)
    return 2 * source.nbytes / timer.blocked_autorange(min_run_time=args.min_run_time).median


def eager_loop(x, h, weight, bias, eps=1e-5):
    """The K add-and-LayerNorm steps as a model writes them, which `torch.compile` may fuse."""
    y = h
    for k in range(weight.shape[0]):
        y = torch.nn.functional.layer_norm(x + y, x.shape[-1:], weight[k], bias[k], eps)
    return y


def op_paths(args) -> dict:
    """name -> (function, Triton kernels selected): the op on each of its paths, the eager loop, the compiled loop."""
    paths = {"op (PyTorch)": (rskip.fused_skip.skip_norm, False)}
    if args.device.startswith("cuda") and rskip.fused_skip.kernels.triton is not None:
        paths["op (Triton)"] = (rskip.fused_skip.skip_norm, True)
    paths["eager loop"] = (eager_loop, False)
    if args.device.startswith("cuda") or args.compile:
        paths["compiled loop"] = (torch.compile(eager_loop, dynamic=False), False)
    return paths


def op_benchmark(args) -> list[dict]:
    """Forward + backward of the op alone against the eager and the compiled loop, at (--op_rows, d) for each of
    --op_features and K in --op_recursions: ms, GB/s over the bytes the op must move, and % of copy bandwidth."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    bandwidth = copy_bandwidth(args)
    print(f"\nthe op alone: {args.op_rows} rows, {dtype}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s",
          flush=True)
    rows = []
    paths = op_paths(args)
    generator = torch.Generator().manual_seed(0)
    for features in args.op_features:
        x, h, grad_y = (torch.randn(args.op_rows, features, generator=generator).to(args.device, dtype)
                        for _ in range(3))
        for k in args.op_recursions:
            weight, bias = (torch.randn(k, features, generator=generator).to(args.device, dtype) for _ in range(2))
            leaves = [t.requires_grad_() for t in (x.clone(), h.clone(), weight, bias)]
            # x and h read, y and z_1 written; dy, x and z_1 read, dh and Σ dz (K > 1) written
            moved = (8 + (k > 1)) * x.numel() * x.element_size()
            times = {}
            for name, (fn, triton) in paths.items():
                def step(fn=fn, triton=triton):
                    with rskip.use_triton(triton):
                        y = fn(*leaves, 1.0, 1e-5, "token") if fn is rskip.fused_skip.skip_norm else fn(*leaves)
                        torch.autograd.backward(y, grad_y)
                step()  # warm-up, compilation
                timer = torch_benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=args.threads)
                times[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median
            for name, seconds in times.items():
                rows.append({"path": name, "features": features, "recursions": k, "ms": seconds * 1e3,
                             "gb_per_s": moved / seconds / 1e9, "copy_bandwidth_share": moved / seconds / bandwidth,
                             "vs_eager_loop": times["eager loop"] / seconds,
                             "vs_compiled_loop": times["compiled loop"] / seconds if "compiled loop" in times else None})
    print(f"{'path':<16} {'d':>6} {'K':>2} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'eager/this':>10} {'compiled/this':>13}")
    for r in rows:
        compiled = "-" if r["vs_compiled_loop"] is None else f"{r['vs_compiled_loop']:.2f}"
        print(f"{r['path']:<16} {r['features']:>6} {r['recursions']:>2} {r['ms']:>8.3f} {r['gb_per_s']:>7.0f} "
              f"{100 * r['copy_bandwidth_share']:>6.1f}% {r['vs_eager_loop']:>10.2f} {compiled:>13}")
    return rows


def plot_op(rows: list[dict], path: Path, title: str) -> None:
    names = [f"{r['path']} d={r['features']} K={r['recursions']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.3 * len(names) + 1.5), sharey=True)
    colors = ["tab:blue" if r["path"].startswith("op") else "tab:orange" for r in rows]
    axes[0].barh(names, [r["ms"] for r in rows], color=colors)
    axes[0].set_xlabel("forward + backward (ms)")
    axes[1].barh(names, [100 * r["copy_bandwidth_share"] for r in rows], color=colors)
    axes[1].set_xlabel("% of measured copy bandwidth")
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_op_results(args, rows: list[dict]) -> list[dict]:
    """With ``--op only``: benchmark.json holds the op's rows alone; either way benchmark_op.png plots them."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.op == "only":
        (output_dir / "benchmark.json").write_text(json.dumps({"args": vars(args), "results": [], "op": rows},
                                                              indent=2))
    if rows:
        plot_op(rows, output_dir / "benchmark_op.png", f"the op alone on {args.device}, {args.op_rows} rows")
        print(f"wrote {output_dir}/benchmark_op.png")
    return rows


def selected_variants(variants: list[dict], args) -> list[dict]:
    """The rows of the skip variants named by --variants (all without it)."""
    return [options for options in variants if not args.variants or options["skip_variant"] in args.variants]


def add_op_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the op alone")
    group.add_argument("--op", choices=("auto", "on", "off", "only"), default="auto",
                       help="time the op alone against the eager and compiled loop: auto = on CUDA; only = no models")
    group.add_argument("--op_rows", type=COUNT, default=16384)
    group.add_argument("--op_features", type=COUNT, nargs="+", default=[512, 1024, 4096])
    group.add_argument("--op_recursions", type=bounded(int, 1, 4), nargs="+", default=[1, 2, 3])
    group.add_argument("--channels_last", action="store_true", help="image models and inputs in channels-last memory")
    parser.add_argument("--variants", nargs="+", choices=rskip.SKIP_VARIANTS, metavar="VARIANT",
                        help="time only these skip variants beside the stock model (default: all)")


IMAGE_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "preact_resnet20", "preact_resnet56",
                "preact_resnet110")


def device(text: str) -> str:
    """--device: a torch device that this machine has."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but this machine has no CUDA device; expected cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (`sys.argv[1:]` when `argv` is None), checked: a bad value stops here, before any model is
    built, with usage and one line naming the flag."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("marian", "resnet"), default="marian")
    parser.add_argument("--output_dir", type=output_folder, default="runs/benchmark")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=COUNT, default=torch.get_num_threads())
    parser.add_argument("--min_run_time", type=POSITIVE, default=1.0, help="seconds of timing per model and round")
    parser.add_argument("--rounds", type=COUNT, default=5, help="timing rounds; each model's median is reported")
    parser.add_argument("--batch_size", type=COUNT, default=16)
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd stock and K = 2 rows")
    group = parser.add_argument_group("marian")
    group.add_argument("--preset", choices=tuple(MARIAN_PRESETS), help="transformer size; overrides the three below")
    group.add_argument("--d_model", type=COUNT, default=256)
    group.add_argument("--heads", type=COUNT, default=4)
    group.add_argument("--layers", type=COUNT, default=3, help="encoder and decoder layers each")
    # the last two ids are padding and end of sentence; the random sentences need at least one more
    group.add_argument("--vocab_size", type=bounded(int, 3), default=8000)
    group.add_argument("--seq_len", type=COUNT, default=32, help="source and target tokens; tokens generated")
    group.add_argument("--generate_batch_size", type=COUNT,
                       help="sentences per beam-4 generate call, at most --batch_size (default: 8, or --batch_size "
                            "if smaller)")
    group = parser.add_argument_group("resnet")
    group.add_argument("--image_model", default="resnet50", choices=IMAGE_MODELS)
    group.add_argument("--image_size", type=bounded(int, 8), default=64)
    add_op_arguments(parser)
    args = parser.parse_args(argv)
    if args.preset:
        vars(args).update(MARIAN_PRESETS[args.preset])
    if args.d_model % args.heads:
        parser.error(f"argument --heads: --d_model {args.d_model} must be divisible by --heads {args.heads}")
    if args.generate_batch_size is None:
        args.generate_batch_size = min(8, args.batch_size)
    if args.family == "marian" and args.generate_batch_size > args.batch_size:
        parser.error(f"argument --generate_batch_size: expected at most --batch_size {args.batch_size}, got "
                     f"{args.generate_batch_size}")
    if args.family == "resnet":
        # BatchNorm in training needs two values per channel: batch x the last stage's pixels
        # (the image divided by 32 for ImageNet ResNets, by 4 for the CIFAR PreAct-ResNets).
        stride = 4 if args.image_model.startswith("preact_") else 32
        if args.batch_size * (-(-args.image_size // stride)) ** 2 < 2:
            parser.error(f"argument --image_size: expected at least {stride + 1} for {args.image_model} with "
                         f"--batch_size 1 (its last stage must keep 2x2 pixels for BatchNorm), got {args.image_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"benchmark: {args.family} on {args.device}, {args.threads} threads", flush=True)
    op_rows = op_benchmark(args) if args.op == "on" or args.op == "only" or (
        args.op == "auto" and args.device.startswith("cuda")) else []
    if args.op == "only":
        return write_op_results(args, op_rows)
    models = marian_models(args) if args.family == "marian" else resnet_models(args)
    results, steps = zip(*(profile(*row, args) for row in models))
    time_steps(results, steps, args)
    stock = results[0]
    for result in results:
        result["time_ratio"] = result["step_seconds"] / stock["step_seconds"]
        result["infer_ratio"] = result["infer_seconds"] / stock["infer_seconds"] if result["infer_seconds"] else None
        result["activation_ratio"] = result["activation_bytes"] / stock["activation_bytes"]
        if "peak_cuda_bytes" in result:
            result["peak_cuda_ratio"] = result["peak_cuda_bytes"] / stock["peak_cuda_bytes"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(f"\n{'model':<62} {'params':>10} {'ms/step':>8} {'step×':>6} {'ms/inf':>8} {'inf×':>6} "
          f"{'act. MiB':>8} {'act.×':>6}" + (f" {'peak×':>6}" if "peak_cuda_ratio" in stock else ""))
    for r in results:
        print(f"{r['model']:<62} {r['parameters']:>10,} {r['step_seconds'] * 1e3:>8.1f} {r['time_ratio']:>6.3f} "
              f"{fmt(r['infer_seconds'] and r['infer_seconds'] * 1e3, '8.1f'):>8} {fmt(r['infer_ratio'], '6.3f'):>6} "
              f"{r['activation_bytes'] / 2**20:>8.1f} {r['activation_ratio']:>6.3f}"
              + (f" {r['peak_cuda_ratio']:>6.3f}" if "peak_cuda_ratio" in r else ""))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark.json").write_text(json.dumps({"args": vars(args), "results": results, "op": op_rows},
                                                          indent=2))
    write_op_results(args, op_rows)
    with open(output_dir / "benchmark.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    precision = "bf16 autocast" if args.device.startswith("cuda") else "fp32"
    plot(results, output_dir / "benchmark.png", f"{args.family} on {args.device} ({precision}), batch {args.batch_size}")
    print(f"\nwrote {output_dir}/benchmark.{{json,csv,png}}")
    return list(results)


def run() -> None:
    """The console script: `main` with errors as one line and an exit status."""
    # imported here: the benchmark itself needs only the model package (scripts/gpu_check.sh carries no datasets)
    from rskip.training.cli import run_main

    run_main(main)


if __name__ == "__main__":
    run()
