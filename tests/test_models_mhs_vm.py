"""MHS-VM: scan routes for any size, the route gate, official parameter names, slice-wise volumes."""

from __future__ import annotations

import pytest
import torch

from napari_medmamba.models.mamba import scan_override
from napari_medmamba.models.mhs_vm import GFU, MHSVM, SliceWise, apply_slicewise, scan_routes


def _flat(pos: list[tuple[int, int]], w: int) -> list[int]:
    return [i * w + j for i, j in pos]


def test_routes_small_known_orders() -> None:
    r = scan_routes(3, 4)
    assert r[0, 0].tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]  # C: snake rows
    assert r[1, 0].tolist() == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]  # C: snake columns
    assert r[2, 0].tolist() == _flat([(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1),
                                      (2, 2), (1, 3), (2, 3)], 4)  # X: diagonal zigzag
    assert r[3, 0].tolist() == _flat([(0, 3), (0, 2), (1, 3), (2, 3), (1, 2), (0, 1), (0, 0), (1, 1), (2, 2),
                                      (2, 1), (1, 0), (2, 0)], 4)  # X mirrored left-right
    assert r[4, 0].tolist() == [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]  # S: clockwise spiral
    assert r[5, 0].tolist() == [8, 9, 10, 11, 7, 3, 2, 1, 0, 4, 5, 6]  # S mirrored top-bottom
    assert r[6, 0].tolist() == list(range(12))  # Z: raster
    assert r[7, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (5, 1), (2, 2), (3, 5), (7, 4), (6, 6), (9, 16)])
def test_routes_are_permutations_with_inverse(hw: tuple[int, int]) -> None:
    h, w = hw
    r = scan_routes(h, w)
    assert r.shape == (8, 2, h * w) and r.device.type == "cpu"
    for k in range(8):
        assert sorted(r[k, 0].tolist()) == list(range(h * w))
        assert torch.equal(r[k, 0][r[k, 1]], torch.arange(h * w))  # pind undoes tind


def test_gfu_gate() -> None:
    x = torch.tensor([[[[1.0, 2.0]], [[1.0, 0.0]], [[1.0, 4.0]], [[1.0, 2.0]]]])  # (b=1, k=4, d=1, l=2)
    y = GFU(t=0.0)(x)
    assert y.shape == (1, 1, 2)
    assert y[0, 0, 0] == 0  # identical routes: CV 0 -> gated off
    col = x[0, :, 0, 1]
    cv = col.std() / ((col - col.min()).mean() + 1e-5)
    torch.testing.assert_close(y[0, 0, 1], col.sum() * cv)
    assert GFU(t=10.0)(x).abs().max() == 0


def test_official_parameter_names_without_aliases() -> None:
    m = MHSVM(in_chans=3, num_classes=2, dims=(24, 48, 96, 192), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1))
    keys = set(m.state_dict())
    block = "layers.0.blocks.0.self_attention."
    for k in ["patch_embed.proj.weight", "patch_embed.norm.weight", f"{block}in_proj.weight",
              f"{block}conv2d.weight", f"{block}conv2d.bias", f"{block}mhs.x_ssproj.weight",
              f"{block}mhs.scanhead_Z.mambaeng.x_proj_weight", f"{block}mhs.scanhead_C.mambaeng.dt_projs_weight",
              f"{block}mhs.scanhead_X.mambaeng.dt_projs_bias", f"{block}mhs.scanhead_S.mambaeng.A_logs",
              f"{block}mhs.scanhead_S.mambaeng.Ds", f"{block}mhs.cat_norm.weight", f"{block}mhs.y_proj.weight",
              f"{block}out_norm.weight", "layers.0.blocks.0.ln_1.weight", "layers.0.downsample.reduction.weight",
              "layers.0.downsample.norm.weight", "layers_up.1.upsample.expand.weight", "layers_up.1.upsample.norm.bias",
              "final_up.expand.weight", "final_up.norm.weight", "final_conv.weight", "final_conv.bias"]:
        assert k in keys, k
    assert not any("x_ssproj_W" in k or "seq2seq_engine" in k or "downsample" in k and "layers.3" in k
                   for k in keys)
    sd = m.state_dict()
    eng = f"{block}mhs.scanhead_C.mambaeng."
    assert sd[eng + "x_proj_weight"].shape == (4, 1 + 32, 6)  # dim_sub 24/4, dt_rank 1, 2 * d_state
    assert sd[eng + "A_logs"].shape == (24, 16) and sd[eng + "Ds"].shape == (24,)
    assert sd["layers_up.1.upsample.expand.weight"].shape == (384, 192)  # Linear(2*96, 4*96)
    assert sd["final_up.expand.weight"].shape == (96, 24) and sd["final_conv.weight"].shape == (2, 6, 1, 1)


def test_any_size_and_one_channel_repeat() -> None:
    torch.manual_seed(0)
    m = MHSVM(in_chans=3, num_classes=2, dims=(12, 24, 48, 96), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1),
              head_num=3).eval()
    x = torch.randn(1, 1, 32, 96)
    with torch.no_grad():
        y1 = m(x)
        y3 = m(x.expand(-1, 3, -1, -1))
    assert y1.shape == (1, 2, 32, 96)
    torch.testing.assert_close(y1, y3)
    with pytest.raises(ValueError, match="divisible by 32"):
        m(torch.zeros(1, 3, 48, 32))


def test_scan_calls_pack_four_routes() -> None:
    m = MHSVM(in_chans=1, num_classes=2, dims=(8, 16), depths=(1, 1), depths_decoder=(1, 1), head_num=2).eval()
    seen = []

    def fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        seen.append((tuple(u.shape), tuple(B.shape), z is None, delta_softplus))
        return torch.zeros_like(u)

    with scan_override(fake), torch.no_grad():
        m(torch.zeros(2, 1, 16, 24))
    # stage 0: 4x6 tokens, dim_sub 4 -> D = 4 routes * 4; stage 1: 2x3 tokens, dim_sub 8; 2 heads per block
    assert seen == [((2, 16, 24), (2, 4, 16, 24), True, True)] * 2 + [((2, 32, 6), (2, 4, 16, 6), True, True)] * 4 \
        + [((2, 16, 24), (2, 4, 16, 24), True, True)] * 2


def test_slicewise_equals_slice_loop() -> None:
    torch.manual_seed(0)
    net = MHSVM(in_chans=1, num_classes=3, dims=(8, 16), depths=(1, 1), depths_decoder=(1, 1), head_num=2).eval()
    vol = torch.randn(1, 1, 3, 8, 16)
    with torch.no_grad():
        for axis in (0, 1, 2):
            if axis:
                v = torch.randn(1, 1, 8, 16, 8) if axis == 1 else torch.randn(1, 1, 8, 8, 5)
            else:
                v = vol
            out = SliceWise(net, axis=axis, batch_size=2)(v)
            assert out.shape == (1, 3, *v.shape[2:])
            for i in range(v.shape[2 + axis]):
                want = net(v.select(2 + axis, i))
                # MHS-VM's route gate divides by a near-zero deviation in places, which turns
                # batched-vs-single float rounding (1e-7) into up to ~1e-4; a wrong slice is O(1).
                torch.testing.assert_close(out.select(2 + axis, i), want, rtol=1e-3, atol=2e-4)
    with pytest.raises(ValueError):
        apply_slicewise(net, torch.zeros(1, 1, 8, 8))


def test_routes_first_built_in_inference_mode_still_train() -> None:
    """The route cache must not hold inference tensors (the engine runs under inference_mode)."""
    scan_routes.cache_clear()
    net = MHSVM(in_chans=1, num_classes=2, dims=(8, 16), depths=(1, 1), depths_decoder=(1, 1), head_num=2)
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        net.eval()(x)
    net.train()(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
