"""Held-out perplexity of any causal LM (dense, masked in memory, or a compact export).

The stock forward of the model runs to the last hidden state; the LM head and the loss then run in
token chunks, as :meth:`actors.forward.LeanDecoder.nll` does, so the full ``(tokens, vocab)``
logits never exist at once. The figure is exact: summed next-token NLL over every window, divided
by the number of predicted tokens (``sequences x (length - 1)``), the same definition the engine
uses for the campaign's held-out figures.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

import search_spaces

from .engine import Score

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["heldout_score", "perplexity"]

#: Tokens per chunk of the LM head + cross-entropy (bounds the logits buffer to chunk x vocab).
LOSS_CHUNK_TOKENS = 512


def heldout_score(model: PreTrainedModel, windows: np.ndarray, *, batch_size: int = 4) -> Score:
    """Summed next-token NLL (float64) and predicted-token count of ``model`` over ``windows`` (N, T)."""
    import torch
    import torch.nn.functional as F

    device = model.get_output_embeddings().weight.device
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total, tokens, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)  # (B, T)
            h = decoder(input_ids=batch, use_cache=False).last_hidden_state  # (B, T, H), final norm applied
            x = h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), H)
            labels = batch[:, 1:].reshape(-1)  # (B*(T-1),)
            for chunk in range(0, x.shape[0], LOSS_CHUNK_TOKENS):
                logits = head(x[chunk : chunk + LOSS_CHUNK_TOKENS]).float()  # (chunk, V)
                total += F.cross_entropy(logits, labels[chunk : chunk + LOSS_CHUNK_TOKENS], reduction="sum").item()
            tokens += int(labels.numel())
    return Score(total, tokens, time.perf_counter() - t0)


def perplexity(score: Score) -> float:
    """exp(mean NLL) of a held-out score (:func:`search_spaces.perplexity`)."""
    return search_spaces.perplexity(score.nll_sum, score.tokens)
