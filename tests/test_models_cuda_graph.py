"""GraphedForward: a CUDA-graph replay gives the eager forward's output, for each new input and shape."""

import pytest
import torch

from napari_medmamba.models.cuda_graph import GraphedForward
from napari_medmamba.models.lightm_unet import LightMUNet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return LightMUNet(spatial_dims=2, init_filters=8, in_channels=1, out_channels=3,
                      blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1)).eval()


def test_refuses_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        GraphedForward(_net())(torch.zeros(1, 1, 16, 16))


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_replay_matches_eager_for_new_inputs_and_shapes(bf16: bool) -> None:
    net = _net().cuda()
    graphed = GraphedForward(net, max_graphs=1)
    with torch.inference_mode():
        for shape in ((2, 1, 64, 48), (2, 1, 64, 48), (1, 1, 32, 32), (2, 1, 64, 48)):
            x = torch.randn(shape, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                eager = net(x).float()
            out = graphed(x, bf16).float()
            assert out.shape == eager.shape
            torch.testing.assert_close(out, eager, rtol=0, atol=1e-2 if bf16 else 1e-4)
    assert len(graphed._graphs) == 1  # the least recently used shape was dropped
