"""The Mamba block: mamba_ssm parameter layout, initialisation and the non-fused forward math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_medmamba.models.mamba import Mamba, scan_override


def test_parameter_names_and_shapes_match_mamba_simple() -> None:
    m = Mamba(d_model=40, d_state=16, d_conv=4, expand=2)  # d_inner 80, dt_rank ceil(40/16) = 3
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (80, 16), "D": (80,), "in_proj.weight": (160, 40), "conv1d.weight": (80, 1, 4),
        "conv1d.bias": (80,), "x_proj.weight": (3 + 32, 80), "dt_proj.weight": (80, 3), "dt_proj.bias": (80,),
        "out_proj.weight": (40, 80)}
    with_bias = Mamba(d_model=16, bias=True, conv_bias=False, dt_rank=5, d_state=8, expand=1)
    keys = set(with_bias.state_dict())
    assert {"in_proj.bias", "out_proj.bias"} <= keys and "conv1d.bias" not in keys
    assert with_bias.x_proj.weight.shape == (5 + 16, 16)


def test_initialisation() -> None:
    torch.manual_seed(0)
    m = Mamba(d_model=64, d_state=8, dt_min=0.002, dt_max=0.05)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 9).float()).expand(128, 8))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert dt.std() > 0  # sampled, not constant
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    const = Mamba(d_model=32, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(const.dt_proj.weight, torch.full_like(const.dt_proj.weight, 2.0 * 2 ** -0.5))
    with pytest.raises(ValueError):
        Mamba(d_model=8, dt_init="bogus")


def _slow_path(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """The mamba_simple non-fused path written out step by step."""
    L = h.shape[1]
    xz = h @ m.in_proj.weight.T
    x, z = xz[..., : m.d_inner], xz[..., m.d_inner:]
    xp = F.pad(x.transpose(1, 2), (m.d_conv - 1, 0))
    x = F.silu(F.conv1d(xp, m.conv1d.weight, m.conv1d.bias, groups=m.d_inner)).transpose(1, 2)  # (B, L, d)
    dbl = x @ m.x_proj.weight.T
    dt, Bm, Cm = dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)  # (B, L, d)
    A = -torch.exp(m.A_log)
    state = torch.zeros(h.shape[0], m.d_inner, m.d_state)
    ys = []
    for t in range(L):
        state = torch.exp(delta[:, t, :, None] * A) * state + (delta[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((state * Cm[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ m.out_proj.weight.T


def test_forward_equals_written_out_slow_path() -> None:
    torch.manual_seed(0)
    m = Mamba(d_model=12, d_state=4, d_conv=3, expand=2).double()
    h = torch.randn(2, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(h), _slow_path(m, h), rtol=1e-9, atol=1e-9)


def test_causal() -> None:
    torch.manual_seed(1)
    m = Mamba(d_model=8, d_state=4)
    h = torch.randn(1, 10, 8)
    h2 = h.clone()
    h2[:, 6:] = torch.randn(1, 4, 8)
    with torch.no_grad():
        a, b = m(h), m(h2)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_scan_call_layout_and_override() -> None:
    m = Mamba(d_model=16, d_state=8)
    seen = []

    def fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        seen.append((u.shape, delta.shape, A.shape, B.shape, C.shape, D.shape, z.shape, delta_bias.shape,
                     delta_softplus))
        return torch.zeros_like(u)

    with scan_override(fake):
        out = m(torch.randn(3, 5, 16))
    d = 32
    assert seen == [((3, d, 5), (3, d, 5), (d, 8), (3, 8, 5), (3, 8, 5), (d,), (3, d, 5), (d,), True)]
    assert torch.equal(out, torch.zeros(3, 5, 16))  # zero scan output -> zero out_proj(0) without bias
    assert math.ceil(16 / 16) == m.dt_rank


def test_channels_first_helpers_equal_torch_layers() -> None:
    """The channels-first LayerNorm / Linear the Mamba layers use equal nn.LayerNorm / nn.Linear on tokens."""
    from napari_medmamba.models.mamba import channels_first_layer_norm, channels_first_linear

    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(12), torch.nn.Linear(12, 7)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    for batch in (1, 3):  # mm and bmm paths
        x = torch.randn(batch, 12, 50) * 3 + 5  # a large mean: the two-pass variance must stay accurate
        ref_norm = norm(x.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(channels_first_layer_norm(norm, x), ref_norm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(channels_first_linear(lin, x), lin(x.transpose(1, 2)).transpose(1, 2),
                                   rtol=1e-5, atol=1e-5)
        assert channels_first_linear(lin, x).is_contiguous()
    x64 = torch.randn(2, 12, 9, dtype=torch.float64)
    assert channels_first_layer_norm(norm.double(), x64).dtype == torch.float64
