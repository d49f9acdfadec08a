"""Inference forward passes replayed from captured CUDA graphs, one graph per input shape.

A small network on a GPU (a 2D LightM-UNet on one 512 x 512 slice, a 3D one on a hippocampus crop) spends
most of its forward pass launching hundreds of small kernels from Python. A CUDA graph records those launches
once and replays them with a single call, so repeated forwards of one shape cost the GPU's time only.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn

__all__ = ["GraphedForward"]


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor
    outputs: torch.Tensor


class GraphedForward:
    """``net(x)`` for inference on CUDA, replayed from a CUDA graph captured at the first call per shape.

    Keeps at most ``max_graphs`` shapes (each holds its own activation memory; the least recently used goes
    first). The returned tensor is the graph's output buffer: it is overwritten by the next call of the same
    shape, so use or copy it before then. Autocast (``bf16``) is part of the graph. Inputs must be CUDA
    tensors; gradients are not recorded.
    """

    def __init__(self, net: nn.Module, max_graphs: int = 2, warmup: int = 2) -> None:
        self.net = net
        self.max_graphs = max(1, int(max_graphs))
        self.warmup = max(1, int(warmup))
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    def _run(self, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return self.net(x)

    def _capture(self, x: torch.Tensor, bf16: bool) -> _Graph:
        inputs = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture: kernel compilation, cuDNN's algorithm search
            for _ in range(self.warmup):
                self._run(inputs, bf16)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._run(inputs, bf16)
        return _Graph(graph, inputs, outputs)

    def __call__(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        if not x.is_cuda:
            raise ValueError("GraphedForward needs a CUDA tensor")
        key = (tuple(x.shape), x.dtype, x.device, bool(bf16))
        entry = self._graphs.get(key)
        with _no_grad():
            if entry is None:
                while len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)
                entry = self._graphs[key] = self._capture(x, bf16)
            else:
                self._graphs.move_to_end(key)
                entry.inputs.copy_(x)
            entry.graph.replay()
        return entry.outputs

    def clear(self) -> None:
        """Drop every captured graph and the memory it holds."""
        self._graphs.clear()


def _no_grad() -> contextlib.AbstractContextManager:
    """No gradient recording, without leaving an inference-mode block the caller may be in."""
    return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.no_grad()
