"""Duration buckets: one static latent shape per engine.

A bucket turns requested seconds into latent frames T (diffusers' AudioLDM2 convention, rounded up
so the audio covers the request) padded up to a multiple of 8, so every UNet level (each halves T)
has an integer grid and a trace at one T never depends on rounding inside the up-blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from litefocus.config import LiteFocusConfig
from litefocus.geometry import HOP_SECONDS, VAE_TIME_DOWNSAMPLE, latent_frames

FRAME_MULTIPLE = 8  # 2 ** (number of UNet downsamples)
LATENT_FREQ_BINS = 16  # AudioLDM2: 64 mel bins / VAE factor 4
LATENT_CHANNELS = 8
SAMPLE_RATE = 16_000
MAX_SECONDS = 320.0  # the longest bucket litefocus-export builds (memory grows ~N^2 without LiteFocus)


def check_seconds(seconds: object) -> float:
    """``seconds`` as a float in (0, MAX_SECONDS], or a ValueError naming the bad value and the fix."""
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"seconds must be a number, got {seconds!r}") from None
    if isinstance(seconds, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
    if value > MAX_SECONDS:
        raise ValueError(f"seconds = {value:g} is above the maximum of {MAX_SECONDS:g} s; split longer audio")
    return value


@dataclass(frozen=True)
class Bucket:
    """One fixed engine length. ``frames`` is the padded latent T (a multiple of 8)."""

    seconds: float  # what was asked for
    frames: int

    @classmethod
    def for_seconds(cls, seconds: float) -> Bucket:
        seconds = check_seconds(seconds)
        t = latent_frames(seconds)
        return cls(seconds=seconds, frames=-(-t // FRAME_MULTIPLE) * FRAME_MULTIPLE)

    def __post_init__(self) -> None:
        if self.frames < FRAME_MULTIPLE or self.frames % FRAME_MULTIPLE:
            raise ValueError(
                f"Bucket.frames must be a positive multiple of {FRAME_MULTIPLE}, got {self.frames}"
            )
        if self.seconds > self.exact_seconds + 1e-9:
            raise ValueError(
                f"Bucket of {self.frames} frames holds {self.exact_seconds} s < {self.seconds} s"
            )

    @property
    def name(self) -> str:
        """Directory-safe label; the manifest, not the name, is the source of truth."""
        return f"{self.exact_seconds:g}s".replace(".", "p")

    @property
    def exact_seconds(self) -> float:
        """Audio the bucket's latent decodes to (before cropping)."""
        return round(self.frames * VAE_TIME_DOWNSAMPLE * HOP_SECONDS, 6)

    @property
    def samples(self) -> int:
        """Waveform samples the decoder produces for this bucket."""
        return round(self.exact_seconds * SAMPLE_RATE)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, T, F] of one latent (batch excluded)."""
        return (LATENT_CHANNELS, self.frames, LATENT_FREQ_BINS)

    def grid(self, freq_bins: int) -> tuple[int, int]:
        """(T, F) token grid of the UNet level whose frequency axis has ``freq_bins`` bins."""
        if freq_bins < 1 or LATENT_FREQ_BINS % freq_bins:
            raise ValueError(f"no UNet level has {freq_bins} frequency bins (latent has {LATENT_FREQ_BINS})")
        return self.frames * freq_bins // LATENT_FREQ_BINS, freq_bins

    def tokens(self, freq_bins: int) -> int:
        t, f = self.grid(freq_bins)
        return t * f

    def num_global(self, config: LiteFocusConfig, freq_bins: int) -> int:
        """LiteFocus S = floor(r * N) at the level with ``freq_bins`` bins."""
        return config.num_global(self.tokens(freq_bins))

    def to_dict(self, config: LiteFocusConfig | None = None) -> dict:
        d = {
            "seconds": self.seconds,
            "exact_seconds": self.exact_seconds,
            "frames": self.frames,
            "latent_shape": list(self.latent_shape),
            "samples": self.samples,
            "tokens": {str(f): self.tokens(f) for f in (8, 4, 2)},
        }
        if config is not None:
            d["num_global"] = {str(f): self.num_global(config, f) for f in config.freq_bins}
        return d
