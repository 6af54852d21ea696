"""Least-squares refit of one MLP's ``down_proj`` (SPRINT's in-compression tuning).

After a block upstream is removed, the MLP block ``r`` that follows it sees other inputs. With
``z`` the input of ``down_proj`` (the gated activations, width ``w``) and ``R`` what ``down_proj``
should add to the residual stream for the pruned model to reproduce a target stream after ``r``
(``R = target_after_r - residual_in - bias``), the refit minimises over ``W`` (``H x w``)

    f(W) = ||Z W^T - R||^2 + lam * ||W - W0||^2,     lam = ridge * mean(diag(Z^T Z)) / tokens

i.e. least squares with a ridge that pulls towards the current weights ``W0``. The target is the
stream the candidate's sensitivity is compared with (``local``, SPRINT's ``out_proj_tuning``: the
current model's window with the candidate kept), or the dense model's stream after ``r`` (``dense``);
actors/sprint.py chooses it per request. ``ridge`` is counted
in tokens: the pull weighs about as much as ``ridge`` calibration tokens of average activation
energy, so it is scale-free and fades as the calibration set grows (a refit of a 576 x 1536
``down_proj`` from 256 tokens needs a strong pull; one from the paper's 262k tokens hardly any). ``Z^T Z`` (w x w) and ``Z^T R`` (w x H) are
accumulated over every calibration token, so memory does not grow with the data: each batch's
products in fp32 (the matmuls), their sum in float64 (elementwise adds, cheap on any GPU). The
sums are then independent of how batches are grouped to ~1e-16, so a step spread over window shards
(whose sums are added on the driver) refits the same weights as a step on one replica, even for an
ill-conditioned system; fp32 sums differed by up to 4e-3 in the weights of a tiny model. The
normal equations are solved in float64 (Cholesky). The old weights are kept, with a status saying why, when
the system is singular, ill-conditioned, the result is not finite, or it does not lower ``f``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

#: Relative residual of the solved normal equations above which the solution is not trusted.
MAX_SOLVE_RESIDUAL = 1e-6


@dataclass(frozen=True)
class FitResult:
    """The refitted weight (``H x w``, fp32; the old one unless ``status == "ok"``) and f before/after."""

    weight: torch.Tensor
    status: str  # ok | empty | nonfinite | singular | ill-conditioned | worse
    before: float  # f(W0)
    after: float  # f(weight)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class DownProjFit:
    """Accumulates ``Z^T Z``, ``Z^T R`` and ``R^T R`` of one refit over token batches."""

    def __init__(self, width: int, hidden: int, device: torch.device | str = "cpu") -> None:
        self.zz = torch.zeros(width, width, dtype=torch.float64, device=device)  # (w, w)
        self.zr = torch.zeros(width, hidden, dtype=torch.float64, device=device)  # (w, H)
        self.rr = 0.0  # sum of R^2, float64 on the host
        self.tokens = 0

    @classmethod
    def from_moments(cls, moments: Mapping[str, Any], device: torch.device | str = "cpu") -> DownProjFit:
        """The fit whose sums are ``moments`` (``zz``, ``zr``, ``rr``, ``tokens``): those of several
        fits over disjoint tokens added up (a step spread over window shards), kept as given (float64
        when the shards were added in float64)."""
        zz, zr = (torch.from_numpy(np.array(moments[k], dtype=np.float64)) for k in ("zz", "zr"))  # own, writable
        fit = cls.__new__(cls)
        fit.zz, fit.zr = zz.to(device), zr.to(device)
        fit.rr, fit.tokens = float(moments["rr"]), int(moments["tokens"])
        return fit

    def add(self, z: torch.Tensor, r: torch.Tensor) -> None:
        """Add tokens: ``z`` (..., w) down_proj inputs, ``r`` (..., H) the residual targets."""
        z = z.reshape(-1, z.shape[-1]).float()  # (M, w)
        r = r.reshape(-1, r.shape[-1]).to(z.device, torch.float32)  # (M, H)
        self.zz += (z.T @ z).to(self.zz.device)  # fp32 product where z is, added in float64 where the sums are
        self.zr += (z.T @ r).to(self.zz.device)
        self.rr += float(r.double().square().sum())
        self.tokens += z.shape[0]

    def objective(self, weight: torch.Tensor, w0: torch.Tensor, lam: float) -> float:
        """f(weight) from the accumulated moments (float64): ||Z W^T - R||^2 + lam ||W - W0||^2."""
        w = weight.double()  # (H, w)
        zz, zr = self.zz.double(), self.zr.double()
        fit = (w @ zz * w).sum() - 2 * (w * zr.T).sum() + self.rr
        return float(fit + lam * (w - w0.double()).square().sum())

    def solve(self, w0: torch.Tensor, ridge: float = 0.0) -> FitResult:
        """Minimise f (see the module docstring) starting from the current weight ``w0`` (H x w)."""
        w0 = w0.detach().to(self.zz.device, torch.float32)
        if self.tokens == 0:
            return FitResult(w0, "empty", float("nan"), float("nan"))
        if not (torch.isfinite(self.zz).all() and torch.isfinite(self.zr).all()) or self.rr != self.rr:
            return FitResult(w0, "nonfinite", float("nan"), float("nan"))
        zz = self.zz.double()
        lam = float(ridge) * float(zz.diagonal().mean()) / self.tokens if ridge > 0 else 0.0
        before = self.objective(w0, w0, lam)
        a = zz + lam * torch.eye(zz.shape[0], dtype=zz.dtype, device=zz.device)  # (w, w), SPD unless singular
        b = self.zr.double() + lam * w0.double().T  # (w, H)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return FitResult(w0, "singular", before, before)
        x = torch.cholesky_solve(b, factor)  # (w, H)
        if not torch.isfinite(x).all():
            return FitResult(w0, "nonfinite", before, before)
        if lam == 0:  # without a ridge, a near-singular system may solve badly: check the residual
            residual = float(torch.linalg.norm(a @ x - b) / torch.linalg.norm(b).clamp_min(1e-300))
            if residual > MAX_SOLVE_RESIDUAL:
                return FitResult(w0, "ill-conditioned", before, before)
        weight = x.T.to(torch.float32).contiguous()  # (H, w)
        # At the solution a x = b: f = rr + lam |W0|^2 - <x, b>, no (w x w) product needed.
        after = float(self.rr + lam * w0.double().square().sum() - (x * b).sum())
        if not after <= before:  # never accept a refit that does not improve what it minimises
            return FitResult(w0, "worse", before, before)
        return FitResult(weight, "ok", before, after)
