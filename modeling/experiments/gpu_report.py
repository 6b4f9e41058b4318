"""The GPU script's results (`rskip.experiments.gpu_evidence`): per-cell summaries over seeds, results.md and the
PNGs (drawn again from results.json with `--replot` where the GPU machine has no matplotlib)."""

import math
from pathlib import Path

from .depth_rules import REGIMES, TRAINS_AT_EXACT_MATCH
from .gpu_budget import MIN_UPDATES
from .gpu_runs import CIFAR_VARIANTS, DEPTH_VARIANTS, TOKENS_PER_BATCH
from .summaries import fmt, mean_std, verdict


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


__all__ = ["cifar_summary", "depth_summary", "draw", "plotting", "write_markdown"]
