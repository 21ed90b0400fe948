"""Trace-time module swaps: the exported graph computes a module differently, the eager model is
untouched after the block (GEGLU split, two-level GroupNorm)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def modules_to_swap(model: torch.nn.Module):
    """``model.modules()`` without the modules whose class sets ``swap_opaque`` and their descendants:
    a swap that computes its wrapped module's children itself (``gpu_form.py``) keeps later swaps
    out of them."""
    if getattr(model, "swap_opaque", False):
        return
    yield model
    for child in model.children():
        yield from modules_to_swap(child)


@contextlib.contextmanager
def swapped(
    models: tuple[torch.nn.Module, ...], kind: type, wrap: Callable[[torch.nn.Module], torch.nn.Module]
):
    """Every child of exactly type ``kind`` in ``models`` replaced by ``wrap(child)`` inside the block
    (yields how many), the originals put back after."""
    found = []
    for model in models:
        for parent in modules_to_swap(model):
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
