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

This module holds the command, the carry and the processes; the budget chooser is in `gpu_budget`, the two kinds of
run in `gpu_runs`, the tables and plots in `gpu_report`.
"""

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
from dataclasses import asdict
from multiprocessing import forkserver
from multiprocessing.connection import wait
from pathlib import Path

import PIL.Image
import torch

from ..command_line import COUNT, POSITIVE, CommandParser, bounded, output_folder
from .depth_rules import REGIMES
from .gpu_budget import MIN_SEEDS, MIN_UPDATES, RunCost, assign_workers, choose_plan, spread
from .gpu_report import cifar_summary, depth_summary, draw, plotting, write_markdown
from .gpu_runs import CIFAR_VARIANTS, DEPTH_VARIANTS, PARTS

CARRY = ".cache/gpu-evidence"
CARRY_FILES = ("manifest.json", "cifar10.pt", "numbers.json")
# Of the budget, for collecting and writing the results and for the processes' exit (seconds on a busy machine).
RESERVE_FRACTION, RESERVE_SECONDS = 0.08, 5.0
CIFAR_BATCH = 128


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


# On a GPU the runs' processes fork from a server that imported torch, rskip, timm and transformers once and never
# touched the GPU: each starts in a moment instead of importing them again, and creates its own CUDA context (a
# process forked after CUDA was initialised cannot). On the CPU they fork from the main process, which has them.
START_METHODS = {"cuda": "forkserver", "cpu": "fork"}
PRELOAD = ["torch", "rskip", "timm.optim", "transformers", "rskip.experiments.gpu_evidence",
           "rskip.experiments.gpu_runs"]


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
