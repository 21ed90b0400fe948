"""GroupNorm over large groups as a two-level reduction in the exported graphs (eager untouched).

A traced ``GroupNorm`` becomes Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, and ONNX
Runtime's CPU InstanceNormalization loses fp32 precision as a group grows. Measured on this CPU,
against a float64 reference, one GroupNorm (32 groups, data N(0, 4) plus a per-channel offset), max
error relative to the output RMS:

    elements per group   2^17    2^18    2^19    2^20    2^21    2^22    2^23
    InstanceNorm         7.5e-6  1.7e-5  4.7e-5  1.5e-4  4.1e-4  1.1e-3  3.2e-3
    two-level (below)    1.6e-6  1.7e-6  2.1e-6  2.4e-6  2.7e-6  3.1e-6  4.9e-6
    PyTorch (eager)      6.1e-7  8.6e-7  7.7e-7  1.1e-6  9.7e-7  7.2e-7  7.7e-7

The VAE's largest groups (the first resnet of its 256-channel up block: 8 channels x 4T x 64) have
2^19 elements at 10 s, 2^22 at 80 s and 2^24 at 320 s, so the decode's error grew ~3x per doubling of
length. ``precise_group_norm(*models)`` swaps every fp32 GroupNorm whose group has at least
``LARGE_GROUP`` elements for ``TwoLevelGroupNorm`` while a graph is traced: the group split into
~sqrt(n) chunks, the mean and the centred sum of squares reduced per chunk and then across chunks
(ONNX Runtime's reductions are accurate at those sizes). It costs ~50% more time per norm (one more
pass over the tensor), so smaller groups keep the single op: at 80 s every UNet group is below 2^19
and its graph is unchanged. fp16 graphs keep the single op too: the loss is an fp32 one (fp16's own
bound is 2e-2), and sums of squares overflow fp16.
"""

from __future__ import annotations

import math

import torch

from litefocus.export.swap import swapped

LARGE_GROUP = 2**19  # elements per group from which the exported norm is two-level


def chunk_count(n: int) -> int:
    """The largest divisor of ``n`` not above sqrt(n): the number of chunks a group of ``n`` splits into."""
    return next(k for k in range(math.isqrt(n), 0, -1) if n % k == 0)


def group_elements(x: torch.Tensor, groups: int) -> int:
    """Elements per group of ``x`` ([B, C, ...]) under a GroupNorm of ``groups`` (static when traced)."""
    return (x.shape[1] // groups) * math.prod(x.shape[2:])


class TwoLevelGroupNorm(torch.nn.Module):
    """``inner``'s function with each group reduced in two levels (same weights, same epsilon)."""

    def __init__(self, inner: torch.nn.GroupNorm):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gn = self.inner
        b, c, g = x.shape[0], x.shape[1], gn.num_groups
        n = group_elements(x, g)
        k = chunk_count(n)
        xg = x.reshape(b, g, k, n // k)  # xg: [B, G, k, n/k]
        mean = xg.mean(-1, keepdim=True).mean(-2, keepdim=True)  # [B, G, 1, 1]
        d = xg - mean
        # per chunk: sqrt(sum d^2) (one ReduceL2, no d^2 tensor); then the mean of their squares
        norms = torch.linalg.vector_norm(d, dim=-1, keepdim=True)  # [B, G, k, 1]
        var = (norms * norms).mean(-2, keepdim=True) / (n // k)  # [B, G, 1, 1]
        y = (d * torch.rsqrt(var + gn.eps)).reshape(x.shape)
        if not gn.affine:
            return y
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * gn.weight.reshape(shape) + gn.bias.reshape(shape)


class SizeGatedGroupNorm(torch.nn.Module):
    """Picks the form by the group size of the input it sees (shapes are static when traced)."""

    def __init__(self, inner: torch.nn.GroupNorm, min_elements: int):
        super().__init__()
        self.inner, self.two_level, self.min_elements = inner, TwoLevelGroupNorm(inner), min_elements

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = group_elements(x, self.inner.num_groups)
        large = n >= self.min_elements and x.dtype == torch.float32
        return self.two_level(x) if large else self.inner(x)


def precise_group_norm(*models: torch.nn.Module, min_elements: int | None = None):
    """Every ``GroupNorm`` of ``models`` exported two-level where its group has at least
    ``min_elements`` (default ``LARGE_GROUP``) elements, inside the block; the originals are put back after."""
    threshold = LARGE_GROUP if min_elements is None else min_elements
    return swapped(models, torch.nn.GroupNorm, lambda gn: SizeGatedGroupNorm(gn, threshold))
