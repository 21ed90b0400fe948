"""Audio length -> AudioLDM2 latent geometry (diffusers' convention; see shared/reference/audioldm2.md)."""

from __future__ import annotations

import math

HOP_SECONDS = 0.01  # mel hop: 160 samples at 16 kHz
VAE_TIME_DOWNSAMPLE = 4


def latent_frames(seconds: float) -> int:
    """Latent time frames T for ``seconds`` of audio: ceil(seconds / 10 ms) rounded up to a multiple
    of 4 mel frames, divided by the VAE's 4x downsampling (10 s -> 250)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
    mel_frames = math.ceil(round(seconds / HOP_SECONDS, 6))
    mel_frames = -(-mel_frames // VAE_TIME_DOWNSAMPLE) * VAE_TIME_DOWNSAMPLE
    return mel_frames // VAE_TIME_DOWNSAMPLE


def level_frames(frames: int, level: int) -> int:
    """Time frames at UNet level ``level`` (each 2x downsample rounds up: conv stride 2, padding 1)."""
    for _ in range(level):
        frames = -(-frames // 2)
    return frames
