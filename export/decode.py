"""The decode stage as one exportable module: latent -> VAE decoder -> mel -> HiFi-GAN vocoder -> waveform.

``DecodeModule`` computes exactly what ``AudioLDM2Pipeline.__call__`` does after the denoising loop
(diffusers 0.42: ``latents = 1 / vae.config.scaling_factor * latents``, ``vae.decode(latents).sample``,
then ``mel_spectrogram_to_waveform``), minus the host copy (``.cpu().float()``) and the crop to the
requested length.

One length detail: AudioLDM2's vocoder (upsample rates [5, 4, 2, 2, 2], kernels [16, 16, 8, 4, 4],
padding (k - r) // 2) returns 160 * mel_frames + 32 samples, not 160 * mel_frames: its first
transposed conv yields 5 L + 1. A bucket's waveform is 160 * mel_frames samples, so the module built
for a contract keeps the first ``contract`` samples. The pipeline crops the same waveform to
``int(seconds * 16000)`` <= bucket samples, so cropping that again gives the pipeline's audio exactly.
"""

from __future__ import annotations

import math

import torch

from litefocus.buckets import LATENT_CHANNELS, LATENT_FREQ_BINS, SAMPLE_RATE
from litefocus.engine.contract import DecodeContract
from litefocus.geometry import HOP_SECONDS


def vae_time_factor(vae) -> int:
    """Mel frames per latent frame (and mel bins per latent bin): 2 per VAE level after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vocoder_samples(vocoder, mel_frames: int) -> int:
    """Waveform length the vocoder returns for ``mel_frames`` frames (only its transposed convs
    change the length; its other convs are 'same'-padded)."""
    length = mel_frames
    for up in vocoder.upsampler:  # ConvTranspose1d
        (k,), (s,), (p,), (d,), (op,) = up.kernel_size, up.stride, up.padding, up.dilation, up.output_padding
        length = (length - 1) * s - 2 * p + d * (k - 1) + op + 1
    return length


def decoded_samples(vae, vocoder, frames: int) -> int:
    """Uncropped waveform length for a latent of ``frames`` frames (AudioLDM2: 640 * frames + 32)."""
    return vocoder_samples(vocoder, frames * vae_time_factor(vae))


def check_decode_contract(vae, vocoder, contract: DecodeContract) -> None:
    """Raise ValueError (naming the mismatch) unless vae + vocoder can serve ``contract``."""
    problems = []
    if vae.config.latent_channels != LATENT_CHANNELS:
        problems.append(
            f"VAE latent_channels is {vae.config.latent_channels}, the contract's latent has "
            f"{LATENT_CHANNELS}"
        )
    mel_bins = LATENT_FREQ_BINS * vae_time_factor(vae)
    if vocoder.config.model_in_dim != mel_bins:
        problems.append(
            f"the VAE decodes {mel_bins} mel bins, the vocoder expects {vocoder.config.model_in_dim}"
        )
    if vocoder.config.sampling_rate != SAMPLE_RATE:
        problems.append(
            f"the vocoder's sampling_rate is {vocoder.config.sampling_rate}, buckets assume {SAMPLE_RATE}"
        )
    hop = round(HOP_SECONDS * SAMPLE_RATE)
    if math.prod(vocoder.config.upsample_rates) != hop:
        problems.append(
            f"the vocoder upsamples by {math.prod(vocoder.config.upsample_rates)}, buckets assume a "
            f"{hop}-sample mel hop"
        )
    (spec,) = contract.outputs
    got = decoded_samples(vae, vocoder, contract.graph_frames)
    if got < spec.shape[1]:
        problems.append(
            f"the decoder yields {got} samples for {contract.graph_frames} latent frames, the "
            f"contract needs {spec.shape[1]}"
        )
    for name, model in (("VAE", vae), ("vocoder", vocoder)):
        dtype = next(model.parameters()).dtype
        if dtype != spec.torch_dtype:
            problems.append(f"the {name} is {dtype}, the contract is {contract.precision}")
    if problems:
        raise ValueError("decode components do not match the DecodeContract: " + "; ".join(problems))


class DecodeModule(torch.nn.Module):
    """waveform = vocoder(vae.decode(latent / scaling_factor).sample.squeeze(1))[:, :samples].

    ``samples=None`` keeps the vocoder's full output; ``for_contract`` checks the components and
    crops to the contract's waveform length.
    """

    def __init__(self, vae, vocoder, samples: int | None = None):
        super().__init__()
        self.vae = vae
        self.vocoder = vocoder
        self.samples = samples

    @classmethod
    def for_contract(cls, vae, vocoder, contract: DecodeContract) -> DecodeModule:
        check_decode_contract(vae, vocoder, contract)
        return cls(vae, vocoder, samples=contract.outputs[0].shape[1])

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        # latent: [B, 8, T, 16]; `1 / s * x` as in the pipeline (bitwise equal to it, unlike `x / s`)
        latent = 1 / self.vae.config.scaling_factor * latent
        mel = self.vae.decode(latent).sample  # [B, 1, 4T, 64]
        waveform = self.vocoder(mel.squeeze(1))  # [B, 640 T + 32]
        if self.samples is not None:
            waveform = waveform[:, : self.samples]  # [B, samples]
        return waveform


def chunking_error(vae, vocoder, contract: DecodeContract, seed: int = 0) -> dict:
    """The time-chunked decode of ``contract`` (PyTorch, window by window) against the full decode of
    the bucket, on one seeded latent: max |error| and RMS error relative to the full waveform's RMS."""
    import time

    import numpy as np

    from litefocus.engine.chunking import decode_chunked

    assert contract.window_frames is not None, "chunking_error needs a windowed DecodeContract"
    t0 = time.perf_counter()
    full_contract = DecodeContract(contract.bucket, batch=contract.batch, precision=contract.precision)
    latent = full_contract.sample_inputs(seed)["latent"].to(next(vae.parameters()).device)
    window = DecodeModule.for_contract(vae, vocoder, contract).eval()
    with torch.no_grad():
        full = DecodeModule.for_contract(vae, vocoder, full_contract).eval()(latent).float().cpu().numpy()
        chunked = decode_chunked(
            lambda x: window(torch.from_numpy(x).to(latent.device)).float().cpu().numpy(),
            latent.cpu().numpy(),
            contract.window_frames,
            contract.overlap_frames,
            contract.samples_per_frame,
        )
    rms = float(np.sqrt(np.mean(full.astype(np.float64) ** 2))) or 1.0
    diff = chunked.astype(np.float64) - full
    return {
        "window_frames": contract.window_frames,
        "overlap_frames": contract.overlap_frames,
        "max_rel_rms_vs_full": float(np.abs(diff).max() / rms),
        "rms_rel_vs_full": float(np.sqrt(np.mean(diff**2)) / rms),
        "seed": seed,
        "seconds": time.perf_counter() - t0,
    }
