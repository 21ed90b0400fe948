"""Tiny random AudioLDM2 components built in code (no hub access), shared by the tests."""

from __future__ import annotations

import torch

# Same structure as cvssp/audioldm2 (4 levels, no attention at the first, [None, x, y]
# transformers per layer, latent F = 16 so the attention levels have 8, 4 and 2 frequency bins),
# with tiny widths.
TINY_UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 8,
    "down_block_types": [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16, 16, 32],
    "layers_per_block": 2,
    "norm_num_groups": 4,
    "cross_attention_dim": [[None, 12, 20]] * 4,
    "attention_head_dim": 2,
}
GPT2_DIM, T5_DIM = 12, 20


def make_tiny_unet(seed: int = 0):
    from diffusers import AudioLDM2UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = AudioLDM2UNet2DConditionModel(**TINY_UNET_CONFIG)
    return unet.eval()


def tiny_unet_inputs(batch: int = 2, frames: int = 24, seed: int = 1, text_len: int = 5) -> dict:
    """Random inputs for one tiny UNet call; latent [B, 8, frames, 16]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, -2:] = 0  # one padded prompt
    return {
        "sample": torch.randn(batch, 8, frames, 16, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 8, GPT2_DIM, generator=g),
        "encoder_hidden_states_1": torch.randn(batch, text_len, T5_DIM, generator=g),
        "encoder_attention_mask_1": mask,
    }


# AudioLDM2's VAE structure (1-channel mel in/out, 8 latent channels, 3 levels: 64 mel bins -> 16
# latent bins, 4 mel frames per latent frame) with tiny widths. The scaling factor differs from the
# real 0.411 so that a hard-coded value would show up.
TINY_VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "latent_channels": 8,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.37,
}
# AudioLDM2's vocoder structure (64 mel bins, 16 kHz, the real upsample rates and kernels: 160
# samples per mel frame, plus the real 32-sample overhang) with tiny channels (32 -> 1). Weights are
# drawn wider than transformers' default (0.01) so the waveform is audible (RMS ~0.04) rather than ~1e-10.
TINY_VOCODER_CONFIG = {
    "model_in_dim": 64,
    "sampling_rate": 16000,
    "upsample_initial_channel": 32,
    "upsample_rates": [5, 4, 2, 2, 2],
    "upsample_kernel_sizes": [16, 16, 8, 4, 4],
    "resblock_kernel_sizes": [3, 7],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "normalize_before": False,
    "initializer_range": 0.15,
}


def make_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return vae.eval()


def make_tiny_vocoder(seed: int = 0):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**TINY_VOCODER_CONFIG))
    return vocoder.eval()
