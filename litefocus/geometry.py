"""Audio length -> AudioLDM2 latent geometry, in diffusers' convention.

AudioLDM2 works on 16 kHz audio: a mel spectrogram with a 160-sample (10 ms) hop and 64 mel bins,
which the VAE downsamples 4x in time and in frequency into a latent [8, T, 16]; the UNet halves T
(rounding up) at each downsampling level. So 10 s is 1000 mel frames and T = 250 latent frames, and
level 1 (8 frequency bins) sees 125 x 8 = 1000 tokens. diffusers' ``AudioLDM2Pipeline`` sizes its
latent the same way from ``audio_length_in_s`` (it truncates a fraction of a 10 ms frame; this rounds
up, so the latent covers the whole request). The table of lengths the method is measured at (10 s to
160 s) is pinned in ``tests/method/test_geometry.py``.
"""

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
