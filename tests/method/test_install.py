"""Installing LiteFocus into (tiny and real-config) AudioLDM2 UNets."""

import re

import pytest
import torch

import litefocus
from litefocus import LiteFocusConfig
from litefocus.installer import draw_global_indices, self_attention_freq_bins
from litefocus.models import random_unet
from tiny_models import make_tiny_unet, tiny_unet_inputs

FRAMES = 24  # latent T; the F = 8 level then has 12 x 8 = 96 tokens
N8 = (FRAMES // 2) * 8


def run(unet, **kw):
    with torch.no_grad():
        return unet(**tiny_unet_inputs(frames=FRAMES, **kw)).sample


def expected_base_modules():
    """The 20 modules named in shared/reference/litefocus.md, for the base config."""
    names = [f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in range(6)]
    names += [f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn1" for i in range(9)]
    names += [f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn2" for i in (0, 3)]
    names += [f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn2" for i in (0, 3, 6)]
    return names


def test_real_base_config_patches_exactly_the_20_reference_modules():
    unet = random_unet("audioldm2", device="meta")
    handle = litefocus.install(unet)
    assert len(handle.modules) == 20
    assert sorted(handle.modules) == sorted(expected_base_modules())
    assert set(handle.freq_bins) == {8}


def test_real_base_config_levels():
    bins = self_attention_freq_bins(random_unet("audioldm2", device="meta"))
    counts = {f: sum(1 for b in bins.values() if b == f) for f in (8, 4, 2)}
    assert counts == {8: 20, 4: 20, 2: 24}  # 20 per level, plus 4 in the mid block at F = 2


def test_tiny_unet_patches_the_same_modules_and_leaves_cross_attention(tiny_unet):
    before = dict(tiny_unet.attn_processors)
    handle = litefocus.install(tiny_unet)
    assert sorted(handle.modules) == sorted(expected_base_modules())
    after = tiny_unet.attn_processors
    for key, proc in after.items():
        name = key.removesuffix(".processor")
        if name in handle.modules:
            assert isinstance(proc, litefocus.processor.LiteFocusAttnProcessor)
            assert not tiny_unet.get_submodule(name).is_cross_attention
        else:
            assert proc is before[key]  # cross-attention and other levels untouched


@pytest.mark.parametrize(
    "bins, count, pattern",
    [
        ((4,), 20, r"(down_blocks\.2|up_blocks\.1)\."),
        ((2,), 24, r"(down_blocks\.3|up_blocks\.0|mid_block)\."),
        ((8, 4), 40, r"(down_blocks\.[12]|up_blocks\.[12])\."),
    ],
)
def test_other_levels(tiny_unet, bins, count, pattern):
    handle = litefocus.install(tiny_unet, LiteFocusConfig(freq_bins=bins))
    assert len(handle.modules) == count
    assert all(re.match(pattern, m) for m in handle.modules)
    run(tiny_unet)  # runs with differently sized S per level


def test_output_changes_and_uninstall_restores_it_exactly(tiny_unet):
    base = run(tiny_unet)
    processors = dict(tiny_unet.attn_processors)
    litefocus.install(tiny_unet)
    patched = run(tiny_unet)
    assert patched.shape == base.shape
    assert (patched - base).abs().max() > 1e-3
    litefocus.uninstall(tiny_unet)
    assert torch.equal(run(tiny_unet), base)
    assert all(tiny_unet.attn_processors[k] is p for k, p in processors.items())
    assert litefocus.get_handle(tiny_unet) is None
    litefocus.install(tiny_unet)  # and it installs again


def test_processor_matches_reference_at_module_level(tiny_unet):
    """One patched module against q/k/v projections + the float64 reference + output projection."""
    handle = litefocus.install(tiny_unet)
    layer = 4
    attn = tiny_unet.get_submodule(handle.modules[layer])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, N8, attn.to_q.in_features, generator=g)
    s = handle.num_global(N8)
    idx = torch.stack([torch.randint(0, N8, (s,), generator=g) for _ in range(handle.num_layers)])
    handle.set_indices(idx)
    with torch.no_grad():
        got = attn(x)
        heads = attn.heads
        q, k, v = (p(x).view(2, N8, heads, -1).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        ref = litefocus.reference_litefocus_attention(
            q, k, v, litefocus.FocusSpec(8, scale=attn.scale), idx[layer]
        )
        want = attn.to_out[0](ref.transpose(1, 2).reshape(2, N8, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fixed_mode_is_deterministic():
    config = LiteFocusConfig(index_mode="fixed", seed=5)
    a = make_tiny_unet()
    litefocus.install(a, config)
    first = run(a)
    assert torch.equal(run(a), first)
    b = make_tiny_unet()
    litefocus.install(b, config)
    assert torch.equal(run(b), first)
    c = make_tiny_unet()
    litefocus.install(c, LiteFocusConfig(index_mode="fixed", seed=6))
    assert (run(c) - first).abs().max() > 1e-5


def test_resample_draws_fresh_and_reseeding_reproduces(tiny_unet):
    handle = litefocus.install(tiny_unet, LiteFocusConfig(seed=11))
    first = run(tiny_unet)
    second = run(tiny_unet)
    assert (first - second).abs().max() > 1e-5  # a fresh sample per call
    handle.manual_seed(11)
    assert torch.equal(run(tiny_unet), first)
    assert torch.equal(run(tiny_unet), second)
    other = make_tiny_unet()
    litefocus.install(other, LiteFocusConfig(seed=11))
    assert torch.equal(run(other), first)


def test_set_indices_reproduces_internal_draws(tiny_unet):
    """Indices drawn layer by layer from the same generator == the handle's own resample draws:
    the property that lets an engine (indices as an input) reproduce the PyTorch path."""
    handle = litefocus.install(tiny_unet)
    handle.manual_seed(3)
    internal = run(tiny_unet)
    g = torch.Generator().manual_seed(3)
    s = handle.num_global(N8)
    handle.set_indices(torch.stack([draw_global_indices(g, N8, s) for _ in range(handle.num_layers)]).int())
    assert torch.equal(run(tiny_unet), internal)
    handle.set_indices(None)
    assert (run(tiny_unet) - internal).abs().max() > 1e-5


def test_cross_frequency_only_and_same_frequency_only_run(tiny_unet):
    outs = []
    for config in (LiteFocusConfig(same_frequency=False), LiteFocusConfig(cross_frequency=False)):
        litefocus.install(tiny_unet, config)
        outs.append(run(tiny_unet))
        litefocus.uninstall(tiny_unet)
    assert all(torch.isfinite(o).all() for o in outs)
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_installing_twice_is_an_error(tiny_unet):
    litefocus.install(tiny_unet)
    with pytest.raises(ValueError, match="already installed"):
        litefocus.install(tiny_unet)


def test_not_an_audioldm2_unet():
    with pytest.raises(ValueError, match="AudioLDM2UNet2DConditionModel, got Linear"):
        litefocus.install(torch.nn.Linear(2, 2))

    class FakePipe:
        unet = None

    with pytest.raises(ValueError, match="pipe.unet"):
        litefocus.install(FakePipe())


def test_no_level_with_the_requested_grid(tiny_unet):
    with pytest.raises(ValueError, match=r"no self-attention level with \[3\] frequency bins.*\[8, 4, 2\]"):
        litefocus.install(tiny_unet, LiteFocusConfig(freq_bins=(8, 3)))
    assert litefocus.get_handle(tiny_unet) is None  # nothing half-installed


def test_wrong_latent_frequency_size(tiny_unet):
    litefocus.install(tiny_unet)
    x = tiny_unet_inputs(frames=FRAMES)
    x["sample"] = torch.randn(2, 8, FRAMES, 32)
    with pytest.raises(ValueError, match="16 frequency bins"):
        tiny_unet(**x)


def test_bad_indices(tiny_unet):
    handle = litefocus.install(tiny_unet)
    s = handle.num_global(N8)
    with pytest.raises(ValueError, match=r"\[layers=20, S\]"):
        handle.set_indices(torch.zeros(19, s, dtype=torch.long))
    with pytest.raises(ValueError, match="negative"):
        handle.set_indices(torch.full((20, s), -1))
    handle.set_indices(torch.zeros(20, s + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=f"needs S = floor.* = {s}"):
        run(tiny_unet)
    handle.set_indices(torch.full((20, s), N8))
    with pytest.raises(ValueError, match=f"outside \\[0, {N8}\\)"):
        run(tiny_unet)


def test_uninstall_when_not_installed(tiny_unet):
    with pytest.raises(ValueError, match="not installed"):
        litefocus.uninstall(tiny_unet)


def test_config_must_be_a_config(tiny_unet):
    with pytest.raises(ValueError, match="LiteFocusConfig"):
        litefocus.install(tiny_unet, {"sparse_ratio": 0.1})


def test_set_indices_with_two_levels_checks_each_layer_against_its_own_tokens(tiny_unet):
    handle = litefocus.install(tiny_unet, LiteFocusConfig(freq_bins=(8, 4)))
    n4 = (FRAMES // 4) * 4
    g = torch.Generator().manual_seed(0)
    rows = [
        draw_global_indices(g, N8 if f == 8 else n4, handle.num_global(N8 if f == 8 else n4))
        for f in handle.freq_bins
    ]
    handle.manual_seed(0)
    internal = run(tiny_unet)
    handle.set_indices(rows)
    assert torch.equal(run(tiny_unet), internal)  # same draws in layer order, levels interleaved
    bad = list(rows)
    bad[handle.freq_bins.index(4)] = torch.full_like(rows[handle.freq_bins.index(4)], n4)
    handle.set_indices(bad)
    with pytest.raises(ValueError, match=f"outside \\[0, {n4}\\)"):
        run(tiny_unet)
