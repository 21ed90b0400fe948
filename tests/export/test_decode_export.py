"""Decode stage (VAE decoder + vocoder): pipeline equivalence, bucket lengths, ONNX export, loading."""

import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import AudioLDM2Pipeline

from litefocus.buckets import Bucket
from litefocus.engine.contract import DecodeContract
from litefocus.export.decode import DecodeModule, decoded_samples
from litefocus.models import load_unet, load_vae, load_vocoder, random_vae, random_vocoder
from tiny_models import TINY_VOCODER_CONFIG, make_tiny_unet, make_tiny_vae, make_tiny_vocoder

# AudioLDM2Pipeline.__call__'s post-processing in diffusers 0.42 (it has no decode_latents method)
PIPELINE_DECODE_LINES = (
    "latents = 1 / self.vae.config.scaling_factor * latents",
    "mel_spectrogram = self.vae.decode(latents).sample",
    "audio = self.mel_spectrogram_to_waveform(mel_spectrogram)",
    "audio = audio[:, :original_waveform_length]",
)


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae(seed=1)


@pytest.fixture(scope="module")
def vocoder():
    return make_tiny_vocoder(seed=2)


def pipeline_decode(vae, vocoder, latents, original_waveform_length):
    """The pipeline's own decode: its post-processing lines (pinned above) with `self` a namespace,
    and its real mel_spectrogram_to_waveform called unbound."""
    self = SimpleNamespace(vae=vae, vocoder=vocoder)
    latents = 1 / self.vae.config.scaling_factor * latents
    mel_spectrogram = self.vae.decode(latents).sample
    audio = AudioLDM2Pipeline.mel_spectrogram_to_waveform(self, mel_spectrogram)
    return audio[:, :original_waveform_length]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_pipeline_decode_lines_are_still_the_pipelines():
    source = inspect.getsource(AudioLDM2Pipeline.__call__)
    for line in PIPELINE_DECODE_LINES:
        assert line in source, f"diffusers changed its decode: {line!r} is gone"


@torch.no_grad()
def test_module_equals_the_pipeline_decode_bitwise(vae, vocoder):
    seconds = 0.5
    contract = DecodeContract(Bucket.for_seconds(seconds), batch=2)
    latent = contract.sample_inputs(seed=3)["latent"]  # [2, 8, 16, 16]
    full = DecodeModule(vae, vocoder)(latent)
    want_full = pipeline_decode(vae, vocoder, latent, None)
    assert full.shape == (2, decoded_samples(vae, vocoder, contract.bucket.frames))
    assert torch.equal(full, want_full)
    assert 0.01 < full.pow(2).mean().sqrt() < 0.5  # a real signal, not ~0 and not saturated
    # the bucket engine's output, cropped like the pipeline crops, is the pipeline's audio
    cropped = DecodeModule.for_contract(vae, vocoder, contract)(latent)
    n = int(seconds * vocoder.config.sampling_rate)
    assert torch.equal(cropped[:, :n], pipeline_decode(vae, vocoder, latent, n))


@pytest.mark.parametrize("seconds", [0.5, 1.0])
@torch.no_grad()
def test_output_length_is_the_contracts(vae, vocoder, seconds):
    contract = DecodeContract(Bucket.for_seconds(seconds))
    frames = contract.bucket.frames
    module = DecodeModule.for_contract(vae, vocoder, contract)
    waveform = module(contract.sample_inputs()["latent"])
    assert waveform.shape == contract.outputs[0].shape == (1, 640 * frames)
    assert int(seconds * 16000) <= waveform.shape[1]
    # the vocoder itself returns 32 samples more (first transposed conv: 5 L + 1)
    assert decoded_samples(vae, vocoder, frames) == 640 * frames + 32


def test_real_components_have_the_same_length_arithmetic():
    vae, vocoder = random_vae(device="meta"), random_vocoder(device="meta")
    assert decoded_samples(vae, vocoder, 256) == 640 * 256 + 32


def test_mismatched_components_are_refused(vae, vocoder):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    contract = DecodeContract(Bucket.for_seconds(0.5))
    with torch.device("meta"):
        wrong = SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                **{**TINY_VOCODER_CONFIG, "model_in_dim": 80, "upsample_rates": [4, 4, 2, 2, 2]}
            )
        )
    with pytest.raises(ValueError, match=r"64 mel bins, the vocoder expects 80.*upsamples by 128"):
        DecodeModule.for_contract(vae, wrong, contract)
    fp16 = DecodeContract(contract.bucket, precision="fp16")
    with pytest.raises(ValueError, match=r"VAE is torch.float32, the contract is fp16"):
        DecodeModule.for_contract(vae, vocoder, fp16)


def test_export_and_validate(vae, vocoder, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from litefocus.export.onnx_export import export_onnx
    from litefocus.export.validate import validate

    contract = DecodeContract(Bucket.for_seconds(0.5))
    module = DecodeModule.for_contract(vae, vocoder, contract)
    graph, data = export_onnx(module, contract, tmp_path / "decode.onnx")
    assert graph.is_file() and data.is_file()
    report = validate(graph, module, contract)
    assert report["outputs"]["waveform"]["max_rel_rms"] <= report["tolerance"]
    model = onnx.load(str(graph), load_external_data=False)

    def specs(values):
        return [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

    assert specs(model.graph.input) == [(s.name, s.shape) for s in contract.inputs]
    assert specs(model.graph.output) == [(s.name, s.shape) for s in contract.outputs]
    assert contract.outputs[0].shape == (1, 10240)


def test_random_components_on_meta():
    state = torch.get_rng_state()
    vae, vocoder = random_vae(device="meta"), random_vocoder(device="meta", dtype=torch.float16)
    assert torch.equal(torch.get_rng_state(), state)
    assert (round(n_params(vae) / 1e6, 1), round(n_params(vocoder) / 1e6, 1)) == (55.4, 55.3)
    assert type(vae).__name__ == "AutoencoderKL" and type(vocoder).__name__ == "SpeechT5HifiGan"
    assert vae.config.scaling_factor == 0.4110932946205139  # from configs/vae.json
    assert vae.config.latent_channels == 8 and vocoder.config.model_in_dim == 64
    assert next(vae.parameters()).is_meta and next(vocoder.parameters()).dtype == torch.float16


@pytest.fixture
def pipeline_dir(tmp_path, vae, vocoder):
    vae.save_pretrained(tmp_path / "vae")
    vocoder.save_pretrained(tmp_path / "vocoder")
    return tmp_path


def assert_same_weights(loaded, original, dtype=torch.float32):
    want = dict(original.named_parameters())
    got = dict(loaded.named_parameters())
    assert got.keys() == want.keys()
    for name, p in got.items():
        assert p.dtype == dtype
        assert torch.equal(p, want[name].to(dtype)), name


@pytest.mark.parametrize("subfolder", [False, True])
def test_load_round_trip(pipeline_dir, vae, vocoder, subfolder):
    loaded_vae = load_vae(pipeline_dir / "vae" if subfolder else pipeline_dir, dtype=torch.float16)
    assert_same_weights(loaded_vae, vae, torch.float16)
    assert loaded_vae.config.scaling_factor == vae.config.scaling_factor
    loaded_vocoder = load_vocoder(pipeline_dir / "vocoder" if subfolder else pipeline_dir)
    assert_same_weights(loaded_vocoder, vocoder)
    assert not loaded_vae.training and not loaded_vocoder.training


@pytest.mark.parametrize("load", [load_vae, load_vocoder])
def test_missing_path(load):
    with pytest.raises(ValueError, match=r"'/no/such/dir' does not exist.*cvssp/audioldm2"):
        load("/no/such/dir")


@pytest.mark.parametrize("load, folder", [(load_vae, "vae"), (load_vocoder, "vocoder")])
def test_directory_without_config(tmp_path, load, folder):
    with pytest.raises(ValueError, match=rf"not an AudioLDM2 diffusers directory.*its {folder}/ folder"):
        load(tmp_path)


@pytest.mark.parametrize(
    "load, folder, config, match",
    [
        (load_vae, "vae", {"_class_name": "AutoencoderTiny"}, "'AutoencoderTiny', not an AutoencoderKL"),
        (
            load_vocoder,
            "vocoder",
            {"architectures": ["SpeechT5ForTextToSpeech"]},
            "'SpeechT5ForTextToSpeech', not a SpeechT5HifiGan",
        ),
    ],
)
def test_directory_with_another_model(tmp_path, load, folder, config, match):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{match}; pass an AudioLDM2 pipeline directory or its {folder}/"):
        load(tmp_path)


def test_components_are_not_interchangeable(pipeline_dir):
    make_tiny_unet().save_pretrained(pipeline_dir / "unet")
    with pytest.raises(ValueError, match="'AutoencoderKL', not an AudioLDM2UNet2DConditionModel"):
        load_unet(pipeline_dir / "vae")
    with pytest.raises(ValueError, match="'AudioLDM2UNet2DConditionModel', not an AutoencoderKL"):
        load_vae(pipeline_dir / "unet")
    with pytest.raises(ValueError, match="'AutoencoderKL', not a SpeechT5HifiGan"):
        load_vocoder(pipeline_dir / "vae")


@pytest.mark.parametrize("load, label", [(load_vae, "VAE"), (load_vocoder, "vocoder")])
def test_unreachable_hub_is_one_clear_error(monkeypatch, load, label):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError, match=rf"the {label} of 'cvssp/audioldm2'.*hub is not reachable.*random_"
    ):
        load("cvssp/audioldm2")


def test_a_stray_data_file_in_the_working_directory_does_not_fail_the_export(
    vae, vocoder, tmp_path, monkeypatch
):
    """onnx checks the external-data name against the current directory: the export saves from the
    graph's own folder, and leaves a file of the same name where it was started alone."""
    from litefocus.export.onnx_export import export_onnx

    monkeypatch.chdir(tmp_path)
    (tmp_path / "decode.onnx.data").write_bytes(b"not ours")
    contract = DecodeContract(Bucket.for_seconds(0.5))
    out = tmp_path / "entry"
    out.mkdir()
    graph, data = export_onnx(
        DecodeModule.for_contract(vae, vocoder, contract), contract, out / "decode.onnx"
    )
    assert data == out / "decode.onnx.data" and data.stat().st_size > 1000
    assert (tmp_path / "decode.onnx.data").read_bytes() == b"not ours"
