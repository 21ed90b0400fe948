"""Time-chunked decode: a window-sized decode graph over overlapping latent windows, cross-faded.

An option for lengths where even a fused, linear-memory decode is too slow or too large: the
bucket's latent [1, C, T, F] is cut into windows of W frames (hop W - O; the last window ends at T),
each decoded alone, and the waveforms are overlap-added with linear cross-fades over the O frames
they share (weights normalized, so an interior sample is a convex mix of its windows' samples).
Not exact: the VAE's mid-block attention and the convolutions see only their window. The export
measures the error against the full decode and records it (``chunking`` in the manifest).
numpy only: the runtime uses it without torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def window_starts(frames: int, window: int, overlap: int) -> list[int]:
    """First latent frame of each window: 0, hop, 2 hop, ..., and a last one ending at ``frames``."""
    if not 0 <= 2 * overlap < window <= frames:
        raise ValueError(f"bad windows: frames {frames}, window {window}, overlap {overlap}")
    starts = list(range(0, frames - window + 1, window - overlap))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


def fade_weights(length: int, fade_in: int, fade_out: int) -> np.ndarray:
    """[length] ones with linear ramps ((i + 0.5) / fade) over the first ``fade_in`` and last
    ``fade_out`` samples: never zero, so every sample's weights sum to more than zero."""
    w = np.ones(length, dtype=np.float64)
    if fade_in:
        w[:fade_in] = (np.arange(fade_in) + 0.5) / fade_in
    if fade_out:
        w[length - fade_out :] = np.minimum(w[length - fade_out :], (np.arange(fade_out)[::-1] + 0.5) / fade_out)
    return w


def decode_chunked(
    decode_window: Callable[[np.ndarray], np.ndarray],
    latent: np.ndarray,
    window: int,
    overlap: int,
    samples_per_frame: int,
) -> np.ndarray:
    """latent [B, C, T, F] -> float32 waveform [B, T * samples_per_frame], through
    ``decode_window(latent [B, C, window, F]) -> [B, window * samples_per_frame]``."""
    b, _, frames, _ = latent.shape
    starts = window_starts(frames, window, overlap)
    span, fade = window * samples_per_frame, overlap * samples_per_frame
    out = np.zeros((b, frames * samples_per_frame), dtype=np.float64)
    total = np.zeros(frames * samples_per_frame, dtype=np.float64)
    for i, start in enumerate(starts):
        piece = np.asarray(decode_window(np.ascontiguousarray(latent[:, :, start : start + window])))
        if piece.shape != (b, span):
            raise RuntimeError(f"the decode window returned {piece.shape}, expected {(b, span)}")
        w = fade_weights(span, fade if i > 0 else 0, fade if i < len(starts) - 1 else 0)
        at = slice(start * samples_per_frame, start * samples_per_frame + span)
        out[:, at] += piece * w
        total[at] += w
    return (out / total).astype(np.float32)
