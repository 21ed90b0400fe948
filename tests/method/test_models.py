"""Model loading: local diffusers directories, hub ids (unreachable here), seeded random presets."""

import json

import pytest
import torch

from litefocus.models import PRESETS, load_unet, random_unet
from tiny_models import make_tiny_unet


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset, millions", [("audioldm2", 346.9), ("audioldm2-music", 346.9), ("audioldm2-large", 718.0)]
)
def test_presets_build_the_real_architecture(preset, millions):
    unet = random_unet(preset, device="meta")
    assert round(n_params(unet) / 1e6, 1) == millions
    assert type(unet).__name__ == "AudioLDM2UNet2DConditionModel"


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = random_unet(seed=0), random_unet(seed=0), random_unet(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(pa[name], pb[name])
    assert not torch.equal(pa[name], pc[name])
    assert all(torch.equal(pa[k], pb[k]) for k in list(pa)[::50])


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'audioldm3'.*audioldm2-large"):
        random_unet("audioldm3", device="meta")
    assert set(PRESETS) == {"audioldm2", "audioldm2-large", "audioldm2-music", "tiny"}


@pytest.mark.parametrize("layout", ["pipeline", "unet"])
def test_load_local_directory(tmp_path, layout):
    unet = make_tiny_unet(seed=3)
    folder = tmp_path / "unet" if layout == "pipeline" else tmp_path
    unet.save_pretrained(folder)
    loaded = load_unet(tmp_path, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    want = dict(unet.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p.float(), want[name].half().float())


def test_missing_path():
    with pytest.raises(ValueError, match=r"'/no/such/dir' does not exist.*cvssp/audioldm2"):
        load_unet("/no/such/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="not an AudioLDM2 diffusers directory"):
        load_unet(tmp_path)


def test_directory_with_another_model(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel.*not an AudioLDM2UNet2DConditionModel"):
        load_unet(tmp_path)


def test_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_unet(f)


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="hub is not reachable.*local directory"):
        load_unet("cvssp/audioldm2")


def test_tiny_preset_is_the_tests_tiny_model():
    from litefocus.models import load_components

    unet, vae, vocoder = load_components("random:tiny:0")
    want = make_tiny_unet(0).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in unet.state_dict().items())
    assert vae.config.scaling_factor == 0.37 and vocoder.config.upsample_rates == [5, 4, 2, 2, 2]


@pytest.mark.parametrize("source", ["random:tiny", "random:tiny:x", "random:huge:0", "random:tiny:0:1"])
def test_bad_random_source(source):
    from litefocus.models import parse_random_source

    with pytest.raises(ValueError, match="random:<preset>:<seed>|unknown preset 'huge'"):
        parse_random_source(source)


def test_unet_structure_of_a_source_has_no_weights(tmp_path):
    from litefocus.models import unet_structure

    meta = unet_structure("random:audioldm2:0")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(
        p.numel() for p in random_unet("audioldm2", device="meta").parameters()
    )
    make_tiny_unet().save_pretrained(tmp_path / "unet")
    local = unet_structure(str(tmp_path))
    assert all(p.is_meta for p in local.parameters())
    for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim"):
        assert json.dumps(local.config[key]) == json.dumps(make_tiny_unet().config[key])
