"""Numbers over seeds, as every experiment reports them: mean ± std, a difference within the seeds' spread called
no difference, validation curves averaged over seeds, and the rule that calls a translation run one that trains,
stalls or diverges."""

import math
import statistics
from collections import Counter
from pathlib import Path


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when there are none; std 0 for one)."""
    values = [value for value in values if value is not None and math.isfinite(value)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float | None], digits: int = 2) -> str:
    """'mean ± std' ('mean' for one value, '—' for none)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def verdict(a: list[float | None], b: list[float | None], higher_is_better: bool = True) -> str:
    """How `a` compares with `b`: 'better', 'worse', or 'no difference' when the gap of the means is within the
    larger standard deviation over seeds (or there is one seed only)."""
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    if math.isnan(mean_a) or math.isnan(mean_b):
        return "—"
    if min(len(a), len(b)) < 2 or abs(mean_a - mean_b) <= max(std_a, std_b):
        return "no difference"
    return "better" if (mean_a > mean_b) == higher_is_better else "worse"


def binomial_error(accuracy: float, samples: int) -> float:
    """The standard error of an accuracy (a fraction) measured on `samples` independent examples."""
    return math.sqrt(accuracy * (1 - accuracy) / samples)


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Several seeds' validation histories averaged step by step, over the steps every seed reached; each metric
    (loss, bleu, chrf, top1) that the records at a step have, its non-finite values left out."""
    if not histories:
        return []
    steps = sorted(set.intersection(*({record["step"] for record in history} for history in histories)))
    averaged = []
    for step in steps:
        records = [record for history in histories for record in history if record["step"] == step]
        averaged.append({"step": step, **{name: mean_std([record[name] for record in records if name in record])[0]
                                          for name in ("loss", "bleu", "chrf", "top1")
                                          if any(name in record for record in records)}})
    return averaged


def unigram_loss(tokenizer_dir: Path, train_targets: list[str], valid_targets: list[str]) -> float:
    """The validation cross-entropy per target token of a model that has learned the target tokens' frequencies
    (from the training targets, add-one smoothed) and nothing else: the line between a run that stalls and one that
    trains."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = Counter(token for ids in tokenizer(text_target=train_targets)["input_ids"] for token in ids)
    total = sum(counts.values())
    tokens = [token for ids in tokenizer(text_target=valid_targets)["input_ids"] for token in ids]
    return -statistics.fmean(math.log((counts[token] + 1) / (total + len(tokenizer))) for token in tokens)


def outcome_of(final_loss: float | None, stalled_above: float, diverged_above: float) -> str:
    """diverges: a non-finite loss (None: the training loss became non-finite), or a final validation loss above
    `diverged_above` (clearly worse than uniform); stalls: not below `stalled_above` (what the target tokens'
    frequencies alone give); trains: below."""
    if final_loss is None or not math.isfinite(final_loss) or final_loss > diverged_above:
        return "diverges"
    return "stalls" if final_loss >= stalled_above else "trains"


__all__ = ["binomial_error", "fmt", "mean_history", "mean_std", "outcome_of", "unigram_loss", "verdict"]
