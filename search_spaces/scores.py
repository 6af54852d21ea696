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
