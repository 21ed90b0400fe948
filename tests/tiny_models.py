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
