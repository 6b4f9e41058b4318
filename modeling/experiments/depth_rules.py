"""What the depth map varies and how it calls a run's outcome: one definition for the CPU grid
(`rskip.experiments.depth_map`) and the GPU script (`rskip.experiments.gpu_evidence`, which runs where the training
library's dependencies are not installed, so this module imports nothing but the standard library)."""

import math
from collections import Counter

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


def bigram_loss(train_targets: list[list[int]], eval_targets: list[list[int]], vocab_size: int,
                discount: float = 0.75) -> float:
    """The per-token cross-entropy on `eval_targets` of a model that knows the training targets' token frequencies
    and the previous token, but never the source (a bigram model, interpolated with absolute discounting): the loss a
    decoder reaches that learned the target language without reading the source."""
    unigram, bigram, following = Counter(), Counter(), Counter()
    for ids in train_targets:
        unigram.update(ids)
        for previous, token in zip([None, *ids], ids):
            bigram[previous, token] += 1
            following[previous] += 1
    types = Counter(previous for previous, _ in bigram)
    total = sum(unigram.values()) + vocab_size
    losses = []
    for ids in eval_targets:
        for previous, token in zip([None, *ids], ids):
            p_unigram = (unigram[token] + 1) / total
            seen = following[previous]
            p = p_unigram if not seen else (max(bigram[previous, token] - discount, 0) / seen
                                             + discount * types[previous] / seen * p_unigram)
            losses.append(-math.log(p))
    return sum(losses) / len(losses)


def divergence_threshold(vocab_size: int) -> float:
    """ln(vocabulary) + 1: a validation loss clearly worse than guessing uniformly."""
    return math.log(vocab_size) + 1.0


def outcome_of(final_loss: float | None, stalled_above: float, diverged_above: float) -> str:
    """diverges: a non-finite loss, or a final validation loss above `diverged_above` (`divergence_threshold`);
    stalls: not below `stalled_above` (`unigram_loss`); trains: below."""
    if final_loss is None or not math.isfinite(final_loss) or final_loss > diverged_above:
        return "diverges"
    return "stalls" if final_loss >= stalled_above else "trains"


# A translation of the number task is either wholly right or wrong; a run that gets most of them right has learned it.
TRAINS_AT_EXACT_MATCH = 50.0


def task_outcome(final_loss: float | None, exact_match: float | None, diverged_above: float) -> str:
    """The depth map's outcome, for runs trained to the end: diverges as in `outcome_of`; trains: at least
    `TRAINS_AT_EXACT_MATCH` % of the test numbers translated exactly; stalls: fewer (a loss below the unigram line is
    not enough: a decoder that never reads the source gets there)."""
    if final_loss is None or not math.isfinite(final_loss) or final_loss > diverged_above:
        return "diverges"
    return "trains" if exact_match is not None and exact_match >= TRAINS_AT_EXACT_MATCH else "stalls"


__all__ = ["REGIMES", "TRAINS_AT_EXACT_MATCH", "bigram_loss", "divergence_threshold", "outcome_of", "task_outcome",
           "unigram_loss"]
