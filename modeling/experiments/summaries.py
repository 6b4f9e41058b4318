"""Numbers over seeds, as every experiment reports them: mean ± std, and a difference within the seeds' spread
called no difference."""

import math
import statistics


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


__all__ = ["binomial_error", "fmt", "mean_std", "verdict"]
