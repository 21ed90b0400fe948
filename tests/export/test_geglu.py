"""GEGLU exported as two projections: the same function as diffusers' GEGLU, and the module put back
after tracing (the exported graph: ``test_export.py``)."""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU

from litefocus.export.geglu import SplitGEGLU, split_geglu


def test_split_geglu_matches_geglu_in_float64():
    torch.manual_seed(0)
    geglu = GEGLU(24, 40).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    want = geglu(x)
    got = SplitGEGLU(geglu)(x)
    assert got.shape == want.shape == (2, 7, 40)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_split_geglu_swaps_every_geglu_and_puts_them_back(tiny_unet):
    before = [m for m in tiny_unet.modules() if type(m) is GEGLU]
    assert before  # the tiny UNet's feed-forwards are GEGLU, as AudioLDM2's are
    with split_geglu(tiny_unet) as n:
        assert n == len(before)
        assert not [m for m in tiny_unet.modules() if type(m) is GEGLU and not _wrapped(tiny_unet, m)]
        assert sum(isinstance(m, SplitGEGLU) for m in tiny_unet.modules()) == n
    assert [m for m in tiny_unet.modules() if type(m) is GEGLU] == before
    assert not any(isinstance(m, SplitGEGLU) for m in tiny_unet.modules())


def _wrapped(model, geglu) -> bool:
    return any(isinstance(m, SplitGEGLU) and m.inner is geglu for m in model.modules())
