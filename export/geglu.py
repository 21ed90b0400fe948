"""GEGLU as two projections in the exported graphs (the eager module is untouched).

diffusers' ``GEGLU`` projects to twice the width and chunks the result: ``h, g = proj(x).chunk(2)``,
``h * gelu(g)``. Traced, that is one MatMul into a [B, N, 2·inner] tensor and a Split copying both
halves out of it: at 80 s the level-1 feed-forward holds 125 MB of projection plus 2 x 62.5 MB of
copies at once, and the Split costs 0.25 s a step on this CPU. ``split_geglu(*models)`` swaps every
GEGLU for ``SplitGEGLU`` while a graph is traced: the same weights, sliced, as two MatMuls straight
into the halves (the export folds the slices into two initializers; the sums are the same ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

from litefocus.export.swap import swapped


class SplitGEGLU(torch.nn.Module):
    """``inner``'s function, computed as two half-width projections."""

    def __init__(self, inner: GEGLU):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = self.inner.proj
        n = proj.out_features // 2
        weight, bias = proj.weight, proj.bias
        # x: [B, N, C] -> h, g: [B, N, n] each
        h = F.linear(hidden_states, weight[:n], None if bias is None else bias[:n])
        g = F.linear(hidden_states, weight[n:], None if bias is None else bias[n:])
        return h * self.inner.gelu(g)


def split_geglu(*models: torch.nn.Module):
    """Every ``GEGLU`` of ``models`` replaced by ``SplitGEGLU`` inside the block, put back after."""
    return swapped(models, GEGLU, SplitGEGLU)
