"""Trace-time module swaps (export/swap.py): what is swapped inside the block, what is put back after.

Each check compares against a value built by hand from fresh random inputs and weights, so a swap
that missed a module, swapped a subclass or an opaque module's child, or failed to restore the
original objects would fail it.
"""

from __future__ import annotations

import pytest
import torch

from litefocus.export.swap import modules_to_swap, swapped
from tiny_models import make_tiny_unet, tiny_unet_inputs


class Opaque(torch.nn.Module):
    """Computes its own children itself: later swaps must leave them alone."""

    swap_opaque = True

    def __init__(self, width: int):
        super().__init__()
        self.inner = torch.nn.Linear(width, width)
        self.act = torch.nn.Tanh()

    def forward(self, x):
        return self.act(self.inner(x))


class MyTanh(torch.nn.Tanh):
    """A subclass of the swapped type: ``swapped`` matches the exact type only."""


class Negated(torch.nn.Module):
    """The swap: the wrapped module's output, negated (a visibly different computation)."""

    def __init__(self, wrapped: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, x):
        return -self.wrapped(x)


def make_model(width: int = 6) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),  # swapped
        torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()),  # nested: swapped
        MyTanh(),  # subclass: kept
        Opaque(width),  # its Tanh: kept
    ).double()


def by_hand(model: torch.nn.Sequential, x: torch.Tensor, negate: bool) -> torch.Tensor:
    """The model's computation written out, with the swapped Tanh's negated or not."""
    sign = -1.0 if negate else 1.0
    h = sign * torch.tanh(model[0](x))
    h = sign * torch.tanh(model[2][0](h))
    h = torch.tanh(h)
    return torch.tanh(model[4].inner(h))


def test_modules_to_swap_skips_an_opaque_module_and_its_children():
    model = make_model()
    seen = list(modules_to_swap(model))
    assert model[4] not in seen and model[4].inner not in seen and model[4].act not in seen
    everything_else = [m for m in model.modules() if m not in (model[4], model[4].inner, model[4].act)]
    assert seen == everything_else
    assert list(modules_to_swap(model[4])) == []


def test_swapped_replaces_exact_type_inside_and_restores_after():
    model = make_model()
    x = torch.randn(3, 6, dtype=torch.float64)
    children = [(name, child) for m in model.modules() for name, child in m.named_children()]
    before = model(x)
    torch.testing.assert_close(before, by_hand(model, x, negate=False), rtol=0, atol=0)
    with swapped((model,), torch.nn.Tanh, Negated) as count:
        assert count == 2  # the top-level and the nested Tanh; not MyTanh, not the opaque one
        assert isinstance(model[1], Negated) and isinstance(model[2][1], Negated)
        assert type(model[3]) is MyTanh and type(model[4].act) is torch.nn.Tanh
        inside = model(x)
    torch.testing.assert_close(inside, by_hand(model, x, negate=True), rtol=0, atol=0)
    assert (inside - before).abs().max() > 1e-3  # the swap changed the computation: the test can fail
    after = [(name, child) for m in model.modules() for name, child in m.named_children()]
    assert all(a[1] is b[1] and a[0] == b[0] for a, b in zip(after, children, strict=True))
    assert torch.equal(model(x), before)


def test_swapped_restores_the_originals_when_the_block_raises():
    model = make_model()
    original = model[1]
    with pytest.raises(RuntimeError, match="boom"), swapped((model,), torch.nn.Tanh, Negated):
        assert isinstance(model[1], Negated)
        raise RuntimeError("boom")
    assert model[1] is original


def test_swapped_over_several_models_and_none_found():
    a, b = make_model(), make_model()
    with swapped((a, b), torch.nn.Tanh, Negated) as count:
        assert count == 4
    with swapped((a, b), torch.nn.GELU, Negated) as count:
        assert count == 0


def test_swapped_on_the_tiny_unet_group_norms():
    """Every GroupNorm of the tiny UNet (at any depth), wrapped by a pass-through that records its
    calls: all of them run through the wrappers, the output is unchanged, the originals return."""
    unet = make_tiny_unet(seed=int(torch.randint(0, 2**31, (1,))))
    norms = [m for m in unet.modules() if type(m) is torch.nn.GroupNorm]
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, gn):
            super().__init__()
            self.gn = gn

        def forward(self, x):
            calls.append(self.gn)
            return self.gn(x)

    inputs = tiny_unet_inputs(batch=1, frames=8, seed=int(torch.randint(0, 2**31, (1,))))
    with torch.no_grad():
        before = unet(**inputs, return_dict=False)[0]
        with swapped((unet,), torch.nn.GroupNorm, Counting) as count:
            inside = unet(**inputs, return_dict=False)[0]
        after = unet(**inputs, return_dict=False)[0]
    assert count == len(norms) > 0
    assert {id(m) for m in calls} == {id(m) for m in norms}  # every norm ran through its wrapper
    assert torch.equal(inside, before) and torch.equal(after, before)
    assert [m for m in unet.modules() if type(m) is torch.nn.GroupNorm] == norms
