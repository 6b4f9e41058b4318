"""Numbers over seeds, as every experiment reports them: mean ± std, a difference within the seeds' spread called
no difference, validation curves averaged over seeds, and the loss a translation run must beat to be said to train
(the outcome rule itself is in `depth_rules`)."""

import math
import statistics
from pathlib import Path

from .depth_rules import unigram_loss


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


def target_ids(tokenizer_dir: Path, *target_sets: list[str]) -> list[list[list[int]]]:
    """Each list of target sentences as token ids of the tokenizer in `tokenizer_dir` (with the end-of-sentence token
    a model must predict), and the vocabulary size last."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer(text_target=targets)["input_ids"] for targets in target_sets] + [len(tokenizer)]


def text_unigram_loss(tokenizer_dir: Path, train_targets: list[str], valid_targets: list[str]) -> float:
    """`depth_rules.unigram_loss` of target sentences, tokenized with the tokenizer in `tokenizer_dir`: the
    validation cross-entropy per token of a model that knows only the training targets' token frequencies."""
    return unigram_loss(*target_ids(tokenizer_dir, train_targets, valid_targets))


__all__ = ["binomial_error", "fmt", "mean_history", "mean_std", "target_ids", "text_unigram_loss", "verdict"]
