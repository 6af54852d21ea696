"""SPRINT's loop as its public code runs it (snudm-starlab/SPRINT, src/sprint.py and
src/utils/compression_utils.py at 1cf355d), written naively for a tiny model: every score from a
fresh forward of the current model, sublayers switched on and off by a status list.

What it keeps of SPRINT's code, line by line in spirit (the code itself is not copied):

- ``get_tuning_subid``: the sublayer a candidate is compared after (and whose MLP is tuned) is the
  next MLP still on after it; with none, the sublayer right after it, capped at the last one;
- ``candidate_selection``: for every sublayer still on, the input is the current model's stream
  entering it; the original output runs it and every sublayer up to the tuning one *with pruned ones
  switched on again* (``batch_forward_multiple(..., is_gt=True)``); the compressed output skips it
  and runs the others as they are; ``add_batch`` for ``l2_sentence``: per sequence
  ``sum(sqrt((o - c)**2)) / sum(sqrt(o**2))`` over tokens x hidden (an L1 norm), summed;
- ``get_target_subids``: importance = score / latency of the sublayer's type (MHA or MLP);
- tunability: the top ``k`` by untuned importance, minus those already in ``tuned_weights``, are
  tuned (``out_proj_tuning``: the down_proj of the tuning MLP fitted so that the compressed stream
  reproduces the original one, the residual added back) and re-scored against the same original
  output; a candidate whose tuning sublayer is itself scores inf and is not remembered;
- the choice is the lowest tuned importance over ``in_comp_manager``'s scores: this step's and those
  remembered from earlier steps; the pruned sublayer's tuned weight is loaded into the model, and
  every remembered entry whose tuning sublayer is at or after the pruned one is dropped (score inf).

Two things follow rayprune rather than SPRINT's code, and are stated where they are: the refit is
rayprune's ridge least squares (actors/refit.py: ``ridge`` tokens of pull towards the current
weights, solved here in float64; SPRINT's default ``damping_coefficient=0`` is ``ridge=0``), and
every untuned score is recomputed each step (SPRINT recomputes those from a checkpoint before the
lowest stale one; in a corner case, two MLPs in a row pruned before the next one, its stale-index
walk misses a block whose window grew; rayprune re-scores exactly the blocks whose window changed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from actors.forward import LeanDecoder
from actors.sprint import mlp_input


@dataclass
class NaiveStep:
    pruned: int
    untuned: dict[int, float]  # every sublayer still on before the step
    top: list[int]
    tuned_now: list[int]  # candidates tuned in this step (the top minus the remembered ones)
    remembered: dict[int, float]  # tuned scores remembered from earlier steps, before the choice
    scores: dict[int, float] = field(default_factory=dict)  # in_comp scores the choice was made over (finite)
    tuned_score: float = math.nan  # that of the pruned sublayer


class NaiveSprint:
    """Runs SPRINT's loop on ``decoder`` (its down_proj weights are replaced as SPRINT loads tuned ones)."""

    def __init__(self, decoder: LeanDecoder, windows: torch.Tensor, latency: dict[str, float], k: int,
                 ridge: float) -> None:
        self.decoder, self.windows, self.latency, self.k, self.ridge = decoder, windows, latency, k, ridge
        self.n = 2 * decoder.arch.num_layers
        self.on = [True] * self.n  # pruning_status
        self.tuned_weights: dict[int, tuple[int, torch.Tensor | None]] = {}  # subid -> (tuning subid, weight)
        self.in_comp = [math.inf] * self.n  # in_comp_manager's scores
        with torch.inference_mode():
            self.h0 = decoder.embed(windows)  # (N, T, H)
            self.rope = decoder.rope(self.h0)

    # ---- forwards ----------------------------------------------------------------------------------
    def sublayer(self, sid: int, h: torch.Tensor, switch_on: bool = False) -> torch.Tensor:
        if not (self.on[sid] or switch_on):
            return h
        arch, layer = self.decoder.arch, sid // 2
        if sid % 2 == 0:
            return self.decoder.attention(layer, h, arch.num_head_units, self.rope)
        return self.decoder.mlp(layer, h, arch.intermediate_size)

    def forward(self, h: torch.Tensor, start: int, stop: int, switch_on: bool = False) -> torch.Tensor:
        """Sublayers ``start..stop`` (inclusive, as ``batch_forward_multiple``)."""
        for sid in range(start, stop + 1):
            h = self.sublayer(sid, h, switch_on)
        return h

    def entering(self, sid: int) -> torch.Tensor:
        return self.forward(self.h0, 0, sid - 1)

    def tuning_subid(self, subid: int) -> int:
        final = subid + 1
        for sid in range(subid + 1, self.n):
            if self.on[sid] and sid % 2 == 1:
                final = sid
                break
        return min(final, self.n - 1)

    @staticmethod
    def l2_sentence(o: torch.Tensor, c: torch.Tensor) -> float:
        o, c = o.reshape(o.shape[0], -1).double(), c.reshape(c.shape[0], -1).double()
        return float((torch.sqrt((o - c) ** 2).sum(1) / torch.sqrt(o**2).sum(1)).sum())

    # ---- one step -----------------------------------------------------------------------------------
    def ranked(self, scores: list[float] | dict[int, float], k: int) -> list[int]:
        """``get_target_subids``: the k lowest of score / latency of the type (ties: lower index)."""
        items = scores.items() if isinstance(scores, dict) else enumerate(scores)
        imp = {s: v / self.latency["MHA" if s % 2 == 0 else "MLP"] for s, v in items}
        return sorted(imp, key=lambda s: (imp[s], s))[:k]

    def step(self) -> NaiveStep:
        with torch.inference_mode():
            return self._step()

    def _step(self) -> NaiveStep:
        untuned = {}
        for subid in range(self.n):  # candidate_selection, every score afresh
            if not self.on[subid]:
                continue
            t = self.tuning_subid(subid)
            h = self.entering(subid)
            original = self.forward(h, subid, t, switch_on=True)
            compressed = self.forward(h, subid + 1, t)
            untuned[subid] = self.l2_sentence(original, compressed)
        top = self.ranked({s: untuned.get(s, math.inf) for s in range(self.n)}, self.k)
        top = [s for s in top if self.on[s]]
        remembered = {s: self.in_comp[s] for s in self.tuned_weights}
        tuned_now = [s for s in top if s not in self.tuned_weights]
        for subid in tuned_now:  # importance_scoring
            t = self.tuning_subid(subid)
            if t == subid or t % 2 == 0 or not self.on[t]:  # nothing to tune (SPRINT: inf or an assertion)
                self.in_comp[subid] = math.inf
                continue
            self.in_comp[subid], weight = self.tune(subid, t)
            self.tuned_weights[subid] = (t, weight)
        scores = {s: v for s, v in enumerate(self.in_comp) if self.on[s] and math.isfinite(v)}
        pruned = self.ranked(list(self.in_comp), 1)[0]
        record = NaiveStep(pruned, untuned, top, tuned_now, remembered, scores, self.in_comp[pruned])
        self.on[pruned] = False  # turn_off + update_status
        self.in_comp[pruned] = math.inf
        t, weight = self.tuned_weights.pop(pruned, (None, None))
        if weight is not None:  # update_tuned_weights
            self.decoder.layers[t // 2].mlp.down_proj.weight.data.copy_(weight)
        for s in list(self.tuned_weights):
            if self.tuned_weights[s][0] >= pruned:
                del self.tuned_weights[s]
                self.in_comp[s] = math.inf
        return record

    def tune(self, subid: int, t: int) -> tuple[float, torch.Tensor | None]:
        """``out_proj_tuning`` of the down_proj of MLP ``t`` for candidate ``subid``; (score, weight)."""
        arch, down = self.decoder.arch, self.decoder.layers[t // 2].mlp.down_proj
        h = self.entering(subid)
        original = self.forward(h, subid, t, switch_on=True)
        residual = self.forward(h, subid + 1, t - 1)  # the input of post_attention_layernorm of t
        z = mlp_input(self.decoder, t // 2, residual, arch.intermediate_size)  # the input of down_proj
        bias = 0.0 if down.bias is None else down.bias
        zf = z.reshape(-1, z.shape[-1]).double()
        rf = (original - residual - bias).reshape(-1, original.shape[-1]).double()
        w0 = down.weight.detach().double()
        zz = zf.T @ zf
        lam = self.ridge * float(zz.diagonal().mean()) / zf.shape[0]  # rayprune's ridge (see the docstring)
        weight = torch.linalg.solve(zz + lam * torch.eye(zz.shape[0], dtype=zz.dtype), zf.T @ rf + lam * w0.T).T
        if not torch.isfinite(weight).all():  # SPRINT drops a tuned weight with nan or inf
            return self.l2_sentence(original, residual + torch.nn.functional.linear(z, down.weight, down.bias)), None
        weight = weight.float()
        compressed = residual + torch.nn.functional.linear(z, weight, down.bias)
        return self.l2_sentence(original, compressed), weight
