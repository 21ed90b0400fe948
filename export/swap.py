"""Trace-time module swaps: the exported graph computes a module differently, the eager model is
untouched after the block (GEGLU split, two-level GroupNorm)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


@contextlib.contextmanager
def swapped(
    models: tuple[torch.nn.Module, ...], kind: type, wrap: Callable[[torch.nn.Module], torch.nn.Module]
):
    """Every child of exactly type ``kind`` in ``models`` replaced by ``wrap(child)`` inside the block
    (yields how many), the originals put back after."""
    found = []
    for model in models:
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if type(child) is kind:
                    found.append((parent, name, child))
    try:
        for parent, name, child in found:
            setattr(parent, name, wrap(child))
        yield len(found)
    finally:
        for parent, name, child in found:
            setattr(parent, name, child)
