"""The down_proj refit: lowers what it minimises, and never hands back NaN weights."""

from __future__ import annotations

import math

import pytest
import torch

from actors.forward import LeanDecoder
from actors.refit import DownProjFit
from actors.sprint import mlp_input
from search_spaces import Block, Mask
from tests.tiny import tiny_arch, tiny_model


def _fit(z: torch.Tensor, r: torch.Tensor, batches: int = 3) -> DownProjFit:
    fit = DownProjFit(z.shape[-1], r.shape[-1])
    for zc, rc in zip(z.chunk(batches), r.chunk(batches)):
        fit.add(zc, rc)
    return fit


def _error(z: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> float:
    return float((z.double() @ w.double().T - r.double()).square().sum())


@pytest.mark.parametrize("ridge", [0.0, 20.0])
def test_refit_lowers_the_error_it_minimises(ridge):
    g = torch.Generator().manual_seed(0)
    z, w0 = torch.randn(200, 16, generator=g), torch.randn(8, 16, generator=g)
    r = z @ torch.randn(16, 8, generator=g) + 0.01 * torch.randn(200, 8, generator=g)
    fit = _fit(z, r)
    result = fit.solve(w0, ridge)
    assert result.ok and result.after < result.before
    assert result.before == pytest.approx(_error(z, r, w0), rel=1e-5)  # moments reproduce the direct error
    lam = ridge * float(fit.zz.diagonal().mean()) / fit.tokens
    assert result.after == pytest.approx(fit.objective(result.weight, w0, lam), rel=1e-4)
    assert _error(z, r, result.weight) < _error(z, r, w0)
    if ridge == 0:  # plain least squares: the normal equations' solution
        expected = torch.linalg.lstsq(z.double(), r.double()).solution.T
        torch.testing.assert_close(result.weight.double(), expected, atol=1e-4, rtol=0)


def test_refit_on_a_tiny_model_reproduces_the_dense_stream_better():
    arch = tiny_arch("llama")
    decoder = LeanDecoder(tiny_model("llama"), arch)
    ids = torch.randint(0, arch.vocab_size, (8, 24), generator=torch.Generator().manual_seed(3))
    mask = Mask().remove(Block(1, "attn"))  # the MLP of layer 1 now sees other inputs
    r = Block(1, "mlp").index
    with torch.inference_mode():
        h = decoder.embed(ids)
        dense_after = decoder.run(h, Mask(), 0, r + 1)
        g = decoder.run(h, mask, 0, r)  # stream entering mlp1 in the pruned model
        down = decoder.layers[1].mlp.down_proj
        z = mlp_input(decoder, 1, g, arch.intermediate_size)
        fit = DownProjFit(arch.intermediate_size, arch.hidden_size)
        fit.add(z, dense_after - g - down.bias)
        result = fit.solve(down.weight, ridge=2.0)
        old = g + torch.nn.functional.linear(z, down.weight, down.bias)
        new = g + torch.nn.functional.linear(z, result.weight, down.bias)
    assert result.ok and torch.isfinite(result.weight).all()
    assert (new - dense_after).norm() < 0.5 * (old - dense_after).norm()


def test_degenerate_inputs_keep_the_old_weights_and_never_give_nan():
    w0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    zero = _fit(torch.zeros(10, 6), torch.randn(10, 4))  # no signal at all: singular
    for ridge in (0.0, 5.0):
        result = zero.solve(w0, ridge)
        assert result.status == "singular" and torch.equal(result.weight, w0)
    bad = torch.randn(10, 6)
    bad[3, 2] = math.nan
    assert _fit(bad, torch.randn(10, 4)).solve(w0, 1.0).status == "nonfinite"
    assert _fit(torch.randn(10, 6), torch.full((10, 4), math.inf)).solve(w0).status == "nonfinite"
    assert DownProjFit(6, 4).solve(w0).status == "empty"
    # Fewer tokens than channels: rank-deficient. Plain least squares may or may not be trusted, ridge is.
    few_z, few_r = torch.randn(3, 6), torch.randn(3, 4)
    plain = _fit(few_z, few_r, 1).solve(w0, 0.0)
    assert torch.isfinite(plain.weight).all() and (not plain.ok or plain.after <= plain.before)
    ridged = _fit(few_z, few_r, 1).solve(w0, 1.0)
    assert ridged.ok and torch.isfinite(ridged.weight).all() and ridged.after < ridged.before
