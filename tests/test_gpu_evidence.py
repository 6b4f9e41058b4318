"""scripts/gpu_evidence.sh and its Python part: the carry it packs here, the budget chooser, the GPU-side data
pipeline, and the whole script end to end on the CPU at a tiny size within its budget."""

import io
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy
import PIL.Image
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, SHARED_DATA
from rskip.experiments import gpu_budget, gpu_evidence, gpu_evidence_pack, gpu_runs
from rskip.experiments.gpu_budget import Plan, RunCost, assign_workers, choose_plan
from rskip.experiments.gpu_evidence import CarryError, check_carry, cifar_processes, costliest, depth_processes
from rskip.experiments.gpu_runs import augment, token_batches
from rskip.experiments.depth_rules import unigram_loss

CIFAR = SHARED_DATA / "cifar10" / "train.parquet"
TINY = ["--device", "cpu", "--cifar_model", "preact_resnet20", "--validation_images", "100", "--batch_size", "16",
        "--depths", "1", "--d_model", "16", "--ffn_dim", "32", "--heads", "2", "--parallel", "2",
        "--probe_updates", "2", "--seeds", "2"]


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    """A tiny carry: 400 CIFAR images, the number task with 200 training pairs, no wheels."""
    folder = tmp_path_factory.mktemp("carry")
    gpu_evidence_pack.main(["--output_dir", str(folder), "--cifar_file", str(CIFAR), "--max_images", "400",
                            "--number_train_size", "200", "--number_eval_size", "20", "--no_wheels"])
    return folder


# ------------------------------------------------------------------------------------------ the budget chooser

def workers_of(*costs_per_worker, seeds=3):
    return [[(seed, cost) for seed in range(seeds) for cost in costs] for costs in costs_per_worker]


# Times in powers of two, so that the arithmetic below is exact: 128 s less a 25% margin leaves 96 s.
def test_the_plan_keeps_every_seed_when_their_runs_reach_the_floor():
    workers = workers_of([RunCost(0.125, 2.0)])  # 3 runs: (96 s - 6 s) / 0.375 s = 240 updates
    assert choose_plan(workers, 128, min_updates=200, max_seeds=3, margin=0.25) == Plan(3, 240, True)


def test_the_plan_drops_to_two_seeds_when_three_cannot_reach_the_floor():
    workers = workers_of([RunCost(0.125, 2.0)])  # 2 runs: (96 - 4) / 0.25 = 368
    assert choose_plan(workers, 128, min_updates=300, max_seeds=3, margin=0.25) == Plan(2, 368, True)


def test_below_the_floor_the_plan_says_so_and_still_fills_the_time_with_the_fewest_seeds():
    workers = workers_of([RunCost(0.125, 2.0)])
    assert choose_plan(workers, 128, min_updates=1000, max_seeds=3, margin=0.25) == Plan(2, 368, False)
    assert choose_plan(workers, 4, min_updates=1, max_seeds=3, margin=0.25) == Plan(2, 0, False)


def test_the_slowest_process_sets_the_number_of_updates():
    workers = workers_of([RunCost(0.125, 1.0)], [RunCost(0.375, 1.0)], seeds=1)  # (96 - 1) / 0.375 = 253.3
    assert choose_plan(workers, 128, min_updates=1, max_seeds=1, min_seeds=1, margin=0.25).updates == 253


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(1e-3, 2.0), st.floats(0.0, 30.0)), min_size=1, max_size=4),
                min_size=1, max_size=6), st.floats(1.0, 600.0), st.integers(1, 2000))
def test_the_planned_runs_fit_the_time_and_one_more_update_would_not(costs, seconds, floor):
    workers = [[(seed, RunCost(*cost)) for seed in range(3) for cost in worker] for worker in costs]
    plan = choose_plan(workers, seconds, min_updates=floor, max_seeds=3)
    usable = seconds * (1 - gpu_budget.PLAN_MARGIN)

    def time_of(updates):
        return [sum(cost.fixed_seconds + updates * cost.update_seconds for seed, cost in runs if seed < plan.seeds)
                for runs in workers]

    assert plan.seeds in (2, 3) and plan.enough == (plan.updates >= floor)
    if plan.updates:
        assert max(time_of(plan.updates)) <= usable + 1e-9
    assert max(time_of(plan.updates + 1)) > usable - 1e-9


def test_processes_go_to_the_depths_with_the_most_work_and_never_exceed_the_runs():
    counts = assign_workers({"6": (18, 6), "12": (18, 12), "24": (18, 24)}, 16)
    assert sum(counts.values()) == 16 and counts["6"] <= counts["12"] <= counts["24"]
    assert assign_workers({"a": (2, 1.0), "b": (1, 5.0)}, 16) == {"a": 2, "b": 1}


def test_every_run_is_given_once_each_process_holds_one_depth_and_probes_its_costliest_run():
    processes = depth_processes([6, 12, 24], seeds=3, parallel=16)
    names = [run["name"] for runs in processes for run in runs]
    assert len(processes) == 16 and len(names) == len(set(names)) == 3 * 2 * 3 * 3
    for runs in processes:
        assert len({run["depth"] for run in runs}) == 1
        assert [run["seed"] for run in runs] == sorted(run["seed"] for run in runs)  # fewer seeds: the last go
        if any(run["variant"] == "rskip_ln K=2" for run in runs):
            assert costliest(runs)["variant"] == "rskip_ln K=2"
    cifar = cifar_processes(seeds=3, parallel=16)
    assert len(cifar) == 12 and all(len(runs) == 1 for runs in cifar)
    assert costliest([run for runs in cifar_processes(seeds=3, parallel=2) for run in runs])["variant"] == \
        "rskip_ln K=3"


class FakeRuns:
    """A part whose runs cost nothing, fail or hang as their names say: what the processes around them do."""

    def __init__(self, context, device):
        if context.get("fail_to_load"):
            raise OSError("no data here")

    def probe(self, run, updates):
        if run["name"].startswith("bad probe"):
            raise RuntimeError("probe failed")
        return RunCost(0.001, 0.0)

    def train(self, run, updates, deadline, log):
        if run["name"].startswith("hangs"):
            time.sleep(600)
        return {**run, "updates_done": updates}


@pytest.fixture
def fake_part(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_evidence.PARTS, "fake", FakeRuns)
    monkeypatch.setitem(gpu_evidence.MIN_UPDATES, "fake", 1)
    (tmp_path / "logs").mkdir()
    context = {"output_dir": str(tmp_path), "threads": 1, "device": "cpu", "probe_updates": 1, "budget_seconds": 60,
               "start_method": "fork", "part_started": time.time()}

    def run(process_runs, seconds, **settings):
        return gpu_evidence.run_part("fake", process_runs, dict(context, **settings), time.time() + seconds, 2,
                                     print)

    return run


def runs_named(*names):
    return [{"name": f"{name} seed {seed}", "seed": seed, "variant": "plain"} for seed in range(2) for name in names]


def test_a_process_that_fails_is_reported_and_the_others_run_on(fake_part):
    part = fake_part([runs_named("good"), runs_named("bad probe")], seconds=30)
    assert sorted(run["name"] for run in part["runs"]) == ["good seed 0", "good seed 1"]
    assert part["errors"] == [{"process": 1, "runs": ["bad probe seed 0", "bad probe seed 1"],
                               "error": "RuntimeError: probe failed"}]


def test_processes_that_cannot_load_their_data_end_the_part_at_once(fake_part):
    started = time.time()
    part = fake_part([runs_named("a"), runs_named("b")], seconds=30, fail_to_load=True)
    assert time.time() - started < 10 and part["plan"] is None and not part["runs"]
    assert [error["error"] for error in part["errors"]] == ["OSError: no data here"] * 2


def test_a_run_still_going_at_the_deadline_is_ended_and_reported_unfinished(fake_part):
    started = time.time()
    part = fake_part([runs_named("good"), runs_named("hangs")], seconds=3)
    assert time.time() - started < 3 + 2 + 6  # the deadline, the grace, the joins
    assert sorted(run["name"] for run in part["runs"]) == ["good seed 0", "good seed 1"]
    assert part["errors"][0]["error"] == "still running at the part's deadline: ended"
    assert part["unfinished"] == ["hangs seed 0", "hangs seed 1"]


# ------------------------------------------------------------------------------------------------ data on the GPU

def test_augmentation_pads_crops_and_flips_each_image():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    augmented = augment(images, torch.Generator().manual_seed(0), padding=2)
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for image, result in zip(padded, augmented):
        windows = [window for top in range(5) for left in range(5)
                   for window in (image[:, top:top + 8, left:left + 8], image[:, top:top + 8, left:left + 8].flip(2))]
        assert any(torch.equal(result, window) for window in windows)
    many = augment(images.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1), padding=2)
    assert not all(torch.equal(a, b) for a, b in zip(many, images.repeat(50, 1, 1, 1)))  # not the identity


def test_token_batches_hold_every_pair_once_within_the_token_limit():
    lengths = [3, 9, 4, 4, 12, 7, 1, 5, 8, 2] * 5
    batches = token_batches(lengths, 24, torch.Generator().manual_seed(0))
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in batch) * len(batch) <= 24 for batch in batches)
    assert batches == token_batches(lengths, 24, torch.Generator().manual_seed(0))


@pytest.fixture
def one_thread():
    """One torch thread, as each of the script's processes on a CPU has (several threads on a busy two-core machine
    make a ResNet-20 step take seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_cifar_run_trains_on_the_decoded_images_and_stops_at_its_deadline(carry, tmp_path, one_thread):
    gpu_evidence.decode_cifar(carry, tmp_path / "decoded.pt")
    runner = gpu_runs.CifarRun({"decoded": str(tmp_path / "decoded.pt"), "validation_images": 100,
                                    "batch_size": 8, "cifar_model": "preact_resnet20"}, torch.device("cpu"))
    run, lines = {"name": "rskip_ln K=3 seed 0", "variant": "rskip_ln K=3", "seed": 0}, []
    cost = runner.probe(run, 1)
    assert cost.update_seconds > 0 and cost.fixed_seconds > 0
    result = runner.train(run, 3, time.time() + 600, lines.append)
    assert result["updates_done"] == 3 and result["stopped"] is None and result["images"] == 100
    assert 0 <= result["top1"] <= 100 and math.isfinite(result["loss"]) and len(result["training_loss"]) == 3
    assert len(lines) == 4 and "validation top-1" in lines[-1]
    late = runner.train(run, 50, time.time() - 1, lines.append)
    assert late["updates_done"] == 1 and late["stopped"] == "stopped at update 1 of 50: the part's deadline"


def test_a_depth_map_run_trains_on_the_carried_ids_and_says_how_it_ended(carry, one_thread):
    runner = gpu_runs.DepthRun({"carry": str(carry), "width": {"d_model": 16, "ffn_dim": 32, "heads": 2}},
                                   torch.device("cpu"))
    run, lines = {"name": "2+2 aggressive rskip_ln K=2 seed 0", "depth": 2, "regime": "aggressive",
                  "variant": "rskip_ln K=2", "seed": 0}, []
    model, _ = runner.build(run)
    assert (model.config.encoder_layers, model.config.d_model, model.config.skip_variant,
            model.config.skip_recursions) == (2, 16, "rskip_ln", 2)
    result = runner.train(run, 3, time.time() + 600, lines.append)
    assert result["updates_done"] == 3 and result["outcome"] in ("trains", "stalls", "diverges")
    assert 0 <= result["exact_match"] <= 100 and result["test_sentences"] == 20 and math.isfinite(result["valid_loss"])
    assert result["unigram_loss"] == pytest.approx(unigram_loss(
        runner.splits["train"]["target_ids"], runner.splits["valid"]["target_ids"], runner.vocab_size))
    late = runner.train(run, 50, time.time() - 1, lines.append)
    assert late["updates_done"] == 1 and "the part's deadline" in late["stopped"]


# -------------------------------------------------------------------------------------------------- the carry

def test_the_carried_jpegs_are_the_datasets_bytes_and_decode_to_its_pixels(carry, tmp_path):
    packed = torch.load(carry / "cifar10.pt", weights_only=True)
    header, scans, offsets = bytes(packed["jpeg_header"].numpy()), packed["jpeg_scans"].numpy(), packed["offsets"]
    table = pq.read_table(CIFAR).slice(0, 400)
    originals = [item["bytes"] for item in table.column("img").to_pylist()]
    assert [header + bytes(scans[offsets[i]:offsets[i + 1]]) for i in range(400)] == originals
    assert packed["labels"].tolist() == table.column("label").to_pylist()
    gpu_evidence.decode_cifar(carry, tmp_path / "decoded.pt")
    decoded = torch.load(tmp_path / "decoded.pt", weights_only=True)
    for index in (0, 399):
        pixels = torch.from_numpy(numpy.array(PIL.Image.open(io.BytesIO(originals[index])).convert("RGB")))
        assert torch.equal(decoded["images"][index].permute(1, 2, 0), pixels)


def test_the_carried_number_task_decodes_to_its_references(carry):
    task = json.loads((carry / "numbers.json").read_text())
    special = set(task["special_ids"])
    for split in task["splits"].values():
        assert [gpu_evidence_pack.decode_pieces(task["pieces"], ids, special) for ids in split["target_ids"]] == \
               split["targets"]
    assert task["model_config"]["d_model"] == 64 and len(task["splits"]["train"]["targets"]) == 200


def test_a_missing_or_damaged_carry_is_one_line_naming_the_file(carry, tmp_path):
    with pytest.raises(CarryError, match="no .*manifest.json: run scripts/gpu_evidence_pack.sh"):
        check_carry(tmp_path)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in carry.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    data = bytearray((damaged / "numbers.json").read_bytes())
    data[10] ^= 1
    (damaged / "numbers.json").write_bytes(bytes(data))
    with pytest.raises(CarryError, match="numbers.json does not match its SHA-256"):
        check_carry(damaged)


def test_the_script_stops_at_once_when_nothing_was_carried(tmp_path):
    started = time.monotonic()
    completed = subprocess.run(["bash", str(REPO / "scripts" / "gpu_evidence.sh"), str(tmp_path / "out"), "--carry",
                                str(tmp_path)], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHON": str(Path(os.sys.executable))})
    assert completed.returncode == 2 and time.monotonic() - started < 10
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json: run scripts/gpu_evidence_pack.sh" in lines[0], completed.stderr


# ------------------------------------------------------------------------------------------------- end to end

# The GPU machine has torch, torchvision, numpy and PIL, and gets rskip's model dependencies as wheels: the script's
# processes must import none of the training library's dependencies, SentencePiece or Accelerate.
NOT_CARRIED = ("datasets", "pyarrow", "evaluate", "sacrebleu", "sentencepiece", "accelerate")


def test_the_script_finishes_within_its_budget_and_writes_every_result(carry, tmp_path):
    budget_minutes = 0.5
    output = tmp_path / "evidence"
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({NOT_CARRIED!r}))\n")
    started = time.monotonic()
    completed = subprocess.run(["bash", str(REPO / "scripts" / "gpu_evidence.sh"), str(output), "--budget_minutes",
                                str(budget_minutes), "--carry", str(carry), *TINY], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "PYTHON": str(Path(os.sys.executable)),
                                                 "PYTHONPATH": str(blocker)})
    elapsed = time.monotonic() - started
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert elapsed <= budget_minutes * 60, elapsed
    results = json.loads((output / "results.json").read_text())
    assert results["elapsed_seconds"] <= budget_minutes * 60
    for name in ("results.md", "cifar_top1.png", "cifar_training_loss.png", "depth_map.png", "gpu_evidence.log"):
        assert (output / name).stat().st_size > 0, name
    assert sorted(path.name for path in (output / "logs").iterdir()) == [
        "cifar-process0.log", "cifar-process1.log", "depth-process0.log", "depth-process1.log"]
    markdown = (output / "results.md").read_text()
    assert "Run on the CPU: no figure here is a GPU measurement." in markdown
    # On a busy machine a part may have had no time for one update: then results.md says so instead of figures.
    for part, runs_per_seed, title in ((results["cifar"], 4, "## CIFAR-10"), (results["depth_map"], 6, "## Depth")):
        assert part["plan"] and not part["errors"] and not part["unfinished"]
        section = markdown.split(title)[1].split("\n## ")[0]
        if part["plan"]["updates"]:
            assert len(part["runs"]) == runs_per_seed * part["plan"]["seeds"]
            # The plan comes from a short probe; on this busy 2-core machine (other tests run beside this one) a
            # slower stretch can bring the deadline first: then the run stops in time and results.md says where.
            for run in part["runs"]:
                assert run["updates_done"] == part["plan"]["updates"] or (
                    run["stopped"] == f"stopped at update {run['updates_done']} of {part['plan']['updates']}: the "
                                      "part's deadline" and f"- {run['name']}: {run['stopped']}" in section), run
            assert "too short to be evidence" in section  # a few updates: said so, not presented as a result
        else:
            assert "Not run: after the probe, not one update fitted in the part's time." in section
    (output / "depth_map.png").unlink()
    gpu_evidence.main([str(output), "--replot"])
    assert (output / "depth_map.png").stat().st_size > 0


def test_the_shared_training_loop_logs_mean_losses_and_stops_at_a_non_finite_one():
    """`train_until`, the loop of both GPU runs: the mean loss of each interval goes into the curve, and the first
    non-finite mean ends the run as diverged."""
    losses = iter([1.0, 3.0, 2.0, 4.0, float("nan"), 1.0] + [1.0] * 94)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                                                 lambda step: 1.0)
    lines = []
    curve, stopped, diverged, update = gpu_runs.train_until(lambda: torch.tensor(next(losses)), schedule, 100,
                                                            time.time() + 60, "run", lines.append)
    assert curve[:2] == [(2, 2.0), (4, 3.0)] and math.isnan(curve[2][1])
    assert (stopped, diverged, update) == ("non-finite training loss at update 6", True, 6)
    assert lines[0].startswith("run update 2/100 loss 2.0000 lr 1.00e-01")
