"""Scores as the searchers see them: perplexity from summed NLL, and its rank order."""

from __future__ import annotations

import math


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL) over ``tokens`` predicted tokens. NaN without tokens or with a NaN sum, inf for
    an infinite sum or a mean past exp's range: NaN/inf are data, ranked last (:func:`rank_value`)."""
    if tokens <= 0 or math.isnan(nll_sum):
        return math.nan
    if not math.isfinite(nll_sum):
        return math.inf
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf


def rank_value(ppl: float) -> float:
    """Perplexity as a sort key: NaN and inf are data, ranked after every finite score."""
    return ppl if math.isfinite(ppl) else math.inf


#: ``search.fitness``: what a calibration score measures.
FITNESSES = ("ppl", "kl")


def fitness_tag(fitness: str, top_k: int | None = None) -> str:
    """How a fitness travels to an evaluator and into cache keys: ``ppl``, ``kl`` (the whole
    vocabulary) or ``kl:<K>`` (the dense model's top K tokens, the rest of the mass folded)."""
    if fitness not in FITNESSES:
        raise ValueError(f"fitness {fitness!r} is not one of {', '.join(FITNESSES)}")
    if fitness == "ppl" or top_k is None:
        return fitness
    if top_k < 1:
        raise ValueError(f"kl top_k must be >= 1, got {top_k}")
    return f"kl:{int(top_k)}"


def parse_fitness(tag: str) -> tuple[str, int | None]:
    """``fitness_tag``'s inverse: (fitness, top_k)."""
    kind, _, k = tag.partition(":")
    fitness_tag(kind, int(k) if k else None)  # validates
    return kind, int(k) if k else None
