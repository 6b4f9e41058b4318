"""The GPU script's budget chooser (`rskip.experiments.gpu_evidence`): from the probe's timings, the seeds and the
number of updates that let every process finish its runs in the part's time, and how processes are shared out.
Pure functions, tested on the CPU."""

import math
from dataclasses import dataclass

MIN_SEEDS = 2
# Below these numbers of updates a run is reported as too short to be evidence (the figures are still shown).
MIN_UPDATES = {"cifar": 2000, "depth": 500}
PLAN_MARGIN = 0.10  # of a part's time, for what the probe did not see


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


__all__ = ["MIN_SEEDS", "MIN_UPDATES", "PLAN_MARGIN", "Plan", "RunCost", "assign_workers", "choose_plan", "spread"]
