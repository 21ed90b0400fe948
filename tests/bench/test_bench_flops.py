"""bench.flops: the analytic UNet FLOP count against torch's FlopCounterMode and the reference table."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from litefocus import LiteFocusConfig
from litefocus.bench.flops import unet_step_flops
from litefocus.buckets import Bucket
from litefocus.installer import install
from litefocus.models import random_unet
from tiny_models import make_tiny_unet, tiny_unet_inputs

TEXT_LEN = 5  # tiny_unet_inputs' default T5 length


def counted_flops(unet, inputs: dict) -> int:
    # The math backend decomposes SDPA into bmm's, which FlopCounterMode prices; the fused CPU
    # kernel would count as 0.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return counter.get_total_flops()


def test_tiny_unet_matches_flop_counter():
    unet = make_tiny_unet()
    counted = counted_flops(unet, tiny_unet_inputs(frames=16, text_len=TEXT_LEN))
    flops = unet_step_flops(unet, 16, text_len=TEXT_LEN, litefocus=None)
    assert flops["total"] == pytest.approx(counted, rel=0.01)
    parts = flops["conv"] + flops["linear"] + flops["self_attention"] + flops["cross_attention"]
    assert parts == flops["total"]
    assert 0 < flops["self_attention_litefocus_level"] == flops["by_freq_bins"][8] < flops["self_attention"]


@pytest.mark.parametrize(
    "config",
    [
        LiteFocusConfig(),
        LiteFocusConfig(same_frequency=False),
        LiteFocusConfig(cross_frequency=False, freq_bins=(8, 4)),
    ],
    ids=["default", "global-only", "same-freq-8-4"],
)
def test_tiny_unet_litefocus_matches_flop_counter(config):
    frames = 16
    unet = make_tiny_unet()
    handle = install(unet, config)
    bucket_tokens = {f: (frames * f // 16) * f for f in (8, 4, 2)}  # N = T_level * F, latent F = 16
    gen = torch.Generator().manual_seed(0)
    handle.set_indices(
        [
            torch.randperm(bucket_tokens[f], generator=gen)[: config.num_global(bucket_tokens[f])]
            for f in handle.freq_bins
        ]
    )
    counted = counted_flops(unet, tiny_unet_inputs(frames=frames, text_len=TEXT_LEN))
    flops = unet_step_flops(unet, frames, text_len=TEXT_LEN, litefocus=config)
    assert flops["total"] == pytest.approx(counted, rel=0.01)
    dense = unet_step_flops(unet, frames, text_len=TEXT_LEN, litefocus=None)
    if config.freq_bins == (8,):
        assert flops["self_attention_litefocus_level"] < dense["self_attention_litefocus_level"]
    assert flops["total"] < dense["total"]
    assert flops["num_global"] == {f: config.num_global(bucket_tokens[f]) for f in config.freq_bins}


# docs/reference table (AudioLDM2 base, batch 2), GFLOP at the unpadded frames of 10 ... 160 s.
REFERENCE_TOTAL = {250: 334, 500: 755, 1000: 1869, 2000: 5185, 4000: 16164}
REFERENCE_SELF_ATTENTION = {250: 45, 500: 181, 1000: 725, 2000: 2898, 4000: 11592}


@pytest.fixture(scope="module")
def base_unet():
    return random_unet("audioldm2", device="meta")


@pytest.mark.parametrize("frames", [250, 2000])
def test_base_config_matches_reference_table(base_unet, frames):
    flops = unet_step_flops(base_unet, frames)  # default text_len = 128
    assert flops["total"] / 1e9 == pytest.approx(REFERENCE_TOTAL[frames], rel=0.03)
    assert flops["self_attention"] / 1e9 == pytest.approx(REFERENCE_SELF_ATTENTION[frames], rel=0.01)
    # The table's totals fit a ~16-token T5 prompt to < 0.1% at every length.
    for fr, ref in REFERENCE_TOTAL.items():
        assert unet_step_flops(base_unet, fr, text_len=16)["total"] / 1e9 == pytest.approx(ref, rel=0.002)


@pytest.mark.parametrize("litefocus", [None, LiteFocusConfig(index_mode="fixed")], ids=["dense", "litefocus"])
def test_base_config_matches_flop_counter_on_meta(litefocus):
    unet = random_unet("audioldm2", device="meta")  # fresh: installing mutates it
    if litefocus is not None:
        install(unet, litefocus)  # "fixed" indices: no data-dependent draw on meta
    frames, text_len = 250, 128
    meta = {"device": "meta"}
    inputs = {
        "sample": torch.empty(2, 8, frames, 16, **meta),
        "timestep": torch.tensor(500, **meta),
        "encoder_hidden_states": torch.empty(2, 8, 768, **meta),
        "encoder_hidden_states_1": torch.empty(2, text_len, 1024, **meta),
        "encoder_attention_mask_1": torch.ones(2, text_len, dtype=torch.long, **meta),
    }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # SDPA on meta is priced
        unet(**inputs)
    flops = unet_step_flops(unet, frames, text_len=text_len, litefocus=litefocus)
    assert flops["total"] == counter.get_total_flops()


def test_bucket_argument_and_litefocus_saving(base_unet):
    bucket = Bucket.for_seconds(80)
    dense = unet_step_flops(base_unet, bucket)
    assert dense == unet_step_flops(base_unet, bucket.frames)
    lite = unet_step_flops(base_unet, bucket, litefocus=LiteFocusConfig())
    t, f = bucket.grid(8)
    s = LiteFocusConfig().num_global(t * f)
    assert lite["num_global"] == {8: s}
    ratio = dense["self_attention_litefocus_level"] / lite["self_attention_litefocus_level"]
    assert ratio == pytest.approx(t * f / (t + s))
    saved = dense["total"] - lite["total"]
    assert saved == dense["self_attention_litefocus_level"] - lite["self_attention_litefocus_level"]


def test_rejects_bad_sizes(base_unet):
    with pytest.raises(ValueError, match="positive"):
        unet_step_flops(base_unet, 0)
