import numba
import numpy as np
import pytest
import torch

from detector.fused_gru import EXP_MAX, EXP_MIN, _exp, gru_step


@numba.njit
def _exp_all(x):
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = _exp(x[i])
    return out


def test_the_polynomial_exponential_is_float32_accurate_over_its_whole_range():
    x = np.linspace(EXP_MIN, EXP_MAX, 100_001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(_exp_all(x) / exact - 1.0)) < 5e-7
    # beyond the range it saturates instead of overflowing to inf or underflowing to denormals
    assert _exp_all(np.array([-1e4, 1e4], dtype=np.float32)).tolist() == pytest.approx(
        np.exp([float(EXP_MIN), float(EXP_MAX)]).tolist(), rel=1e-6
    )


@pytest.mark.parametrize("batch", [1, 7, 4096])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])  # from linear gates to fully saturated ones
def test_the_fused_step_is_as_accurate_as_torch_gru_cell(batch, scale):
    torch.manual_seed(batch)
    cell = torch.nn.GRUCell(5, 16)
    with torch.no_grad():
        for weight in cell.parameters():
            weight.mul_(scale)
        x, h = torch.randn(batch, 5) * scale, torch.randn(batch, 16).tanh()
        torch_error = (cell(x, h).double() - cell.double()(x.double(), h.double())).abs().max()
        exact = cell(x.double(), h.double())
        fused = gru_step(x, h, *(w.float() for w in cell.parameters()))
    # Both sum the products in float32, in different orders: with saturated gates each is off
    # by a few float32 steps of the pre-activations (~1e-5 at scale 30), no more than torch.
    assert (fused.double() - exact).abs().max() <= 2 * torch_error + 2e-6


def test_a_non_contiguous_state_is_read_correctly():
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(3, 8)
    states = torch.randn(4, 2, 8)  # (B, L, S): layer 1 of each row is a strided view
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = cell(x, states[:, 1])
        weights = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
        fused = gru_step(x, states[:, 1], *weights)
    torch.testing.assert_close(fused, expected, atol=2e-6, rtol=1e-5)
