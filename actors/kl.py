"""KL fitness: how far a masked model's next-token distributions are from the dense model's.

``search.fitness: kl`` scores a mask by the mean per-token ``KL(dense || masked)`` on the
calibration windows instead of its perplexity (EvoPress's fitness). A replica computes the dense
model's log-probabilities once per window set (:class:`DenseReference`, kept on the replica's
device) and every later score compares against them. With ``top_k``, only the K most likely tokens
of each position are kept (indices and log-probabilities) and the rest of the mass is folded into
one bucket: ``sum_k p_k log(p_k / q_k) + p_rest log(p_rest / q_rest)``, the KL of the two
distributions coarsened to K + 1 outcomes, which never exceeds the exact KL (memory: K x 12 bytes
per token instead of V x 4).

The score travels like an NLL (a float64 sum and a token count), so the cache, the shards and the
searchers handle it unchanged; the perplexity-like figure the searchers rank is ``exp(mean KL)``
(1 for the dense model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .forward import LOSS_CHUNK_TOKENS, LeanDecoder
from search_spaces import Mask


@dataclass
class DenseReference:
    """The dense model's log-probabilities of every predicted position of a window set: ``logp``
    (N, T-1, V) fp32, or with ``top_k`` the K largest (N, T-1, K) and their token ``index``."""

    logp: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def top_k(self) -> int | None:
        return None if self.index is None else self.logp.shape[-1]

    def rows(self, start: int, stop: int) -> DenseReference:
        return DenseReference(self.logp[start:stop], None if self.index is None else self.index[start:stop])

    @classmethod
    def compute(cls, decoder: LeanDecoder, windows: torch.Tensor, batch_size: int,
                top_k: int | None = None) -> DenseReference:
        """Run the dense model over ``windows`` (N, T) once and keep what the KL needs."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"kl top_k must be >= 1 (or None: the whole vocabulary), got {top_k}")
        values, indices = [], []
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size]
                logp = _log_probs(decoder, decoder.run(decoder.embed(batch), Mask()))  # (B, T-1, V) fp32
                if top_k is not None:
                    top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                    values.append(top.values)
                    indices.append(top.indices)
                else:
                    values.append(logp)
        return cls(torch.cat(values), torch.cat(indices) if top_k is not None else None)


def _log_probs(decoder: LeanDecoder, h: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of the next-token logits at every position but the last: (B, T-1, V)."""
    h = h.to(decoder.lm_head.weight.device)
    x = decoder.final_norm(h[:, :-1])
    return F.log_softmax(decoder.lm_head(x).float(), dim=-1)


def kl_sum(decoder: LeanDecoder, h: torch.Tensor, reference: DenseReference) -> tuple[float, int]:
    """Summed per-token KL(dense || masked) (float64) of final streams ``h`` (B, T, H) against the
    reference rows of the same windows, and the number of positions; the head runs in chunks."""
    device = decoder.lm_head.weight.device  # where the logits are: the final norm may sit on another GPU
    h = h.to(device)
    x = decoder.final_norm(h[:, :-1]).reshape(-1, h.shape[-1])  # (B*(T-1), H)
    ref = reference.logp.to(device).reshape(x.shape[0], -1)  # (B*(T-1), V or K)
    index = None if reference.index is None else reference.index.to(device).reshape(x.shape[0], -1)
    total = 0.0
    for start in range(0, x.shape[0], LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        logq = F.log_softmax(decoder.lm_head(x[chunk]).float(), dim=-1)  # (c, V)
        logp = ref[chunk]
        if index is None:
            total += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
            continue
        logq_k = logq.gather(1, index[chunk])  # (c, K)
        p_k = logp.exp()
        kept = (p_k * (logp - logq_k)).sum(dim=1, dtype=torch.float64)
        if logp.shape[1] >= logq.shape[1]:  # K = V: nothing folded (1 - sum p is rounding noise, not mass)
            total += float(kept.sum())
            continue
        p_rest = (1 - p_k.sum(dim=1, dtype=torch.float64)).clamp_min(0)
        q_rest = (1 - logq_k.exp().sum(dim=1, dtype=torch.float64)).clamp_min(1e-30)
        rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), 0.0)
        total += float((kept + rest).sum())
    return total, int(x.shape[0])
