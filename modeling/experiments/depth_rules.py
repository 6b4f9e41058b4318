"""What the depth map varies and how it calls a run's outcome: one definition for the CPU grid
(`rskip.experiments.depth_map`) and the GPU script (`rskip.experiments.gpu_evidence`, which runs where the training
library's dependencies are not installed, so this module imports nothing but the standard library)."""

import math

# Peak rate and the warm-up as a fraction of the run.
REGIMES = {"moderate": (1e-3, 1 / 6), "aggressive": (3e-3, 0.0)}


def unigram_loss(train_targets: list[list[int]], eval_targets: list[list[int]], vocab_size: int) -> float:
    """The per-token cross-entropy on `eval_targets` of a model that knows only the training targets' token
    frequencies (add-one smoothed over the vocabulary, so that an unseen token costs a finite loss): the line
    between a run that stalls and one that trains."""
    counts = [1] * vocab_size
    for ids in train_targets:
        for token in ids:
            counts[token] += 1
    total = sum(counts)
    tokens = [token for ids in eval_targets for token in ids]
    return -sum(math.log(counts[token] / total) for token in tokens) / len(tokens)


def divergence_threshold(vocab_size: int) -> float:
    """ln(vocabulary) + 1: a validation loss clearly worse than guessing uniformly."""
    return math.log(vocab_size) + 1.0


def outcome_of(final_loss: float | None, stalled_above: float, diverged_above: float) -> str:
    """diverges: a non-finite loss, or a final validation loss above `diverged_above` (`divergence_threshold`);
    stalls: not below `stalled_above` (`unigram_loss`); trains: below."""
    if final_loss is None or not math.isfinite(final_loss) or final_loss > diverged_above:
        return "diverges"
    return "stalls" if final_loss >= stalled_above else "trains"


__all__ = ["REGIMES", "divergence_threshold", "outcome_of", "unigram_loss"]
