"""`LiteFocusConfig`: every setting of the LiteFocus method, validated once.

The config is a frozen dataclass that round-trips through a plain dict (and so JSON): the
export manifest stores it, and nothing about the method is ever inferred from file names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

INDEX_MODES = ("resample", "fixed")


@dataclass(frozen=True)
class LiteFocusConfig:
    """How LiteFocus replaces self-attention (Tan et al., Interspeech 2024).

    Attributes:
        same_frequency: each query attends to the keys of its own frequency bin across all time.
        cross_frequency: each query also attends to one shared sample of
            ``floor(sparse_ratio * N)`` tokens drawn from the whole grid.
        sparse_ratio: r in (0, 1], the size of the shared sample relative to the N tokens.
        index_mode: ``"resample"`` draws a fresh sample at every attention call (as the reference
            code does); ``"fixed"`` uses one seeded sample per layer and token count.
        seed: seeds the sample generator (both modes); a non-negative int.
        freq_bins: apply at the UNet level(s) whose token grid has this many frequency bins.
            AudioLDM2's latent has 16 bins, so 8 is the 256-channel level (the paper's choice),
            4 the 384-channel level and 2 the 640-channel level and mid block.
    """

    same_frequency: bool = True
    cross_frequency: bool = True
    sparse_ratio: float = 0.1
    index_mode: str = "resample"
    seed: int = 0
    freq_bins: tuple[int, ...] = (8,)

    def __post_init__(self) -> None:
        for name in ("same_frequency", "cross_frequency"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LiteFocusConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.same_frequency or self.cross_frequency):
            raise ValueError(
                "LiteFocusConfig: same_frequency and cross_frequency are both False, so a query would "
                "attend to nothing; turn at least one on (or do not install LiteFocus)"
            )
        r = self.sparse_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
            raise ValueError(f"LiteFocusConfig.sparse_ratio must be a number in (0, 1], got {r!r}")
        object.__setattr__(self, "sparse_ratio", float(r))
        if self.index_mode not in INDEX_MODES:
            raise ValueError(
                f"LiteFocusConfig.index_mode must be one of {', '.join(INDEX_MODES)}, got {self.index_mode!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LiteFocusConfig.seed must be a non-negative int, got {self.seed!r}")
        bins = self.freq_bins
        if isinstance(bins, int) and not isinstance(bins, bool):
            bins = (bins,)
        if not isinstance(bins, (tuple, list)) or not bins:
            raise ValueError(
                f"LiteFocusConfig.freq_bins must be a non-empty tuple of ints, got {self.freq_bins!r}"
            )
        for b in bins:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"LiteFocusConfig.freq_bins entries must be positive ints, got {b!r}")
        if len(set(bins)) != len(bins):
            raise ValueError(f"LiteFocusConfig.freq_bins has duplicates: {tuple(bins)!r}")
        object.__setattr__(self, "freq_bins", tuple(bins))
        # r as the decimal it prints as, kept as an exact integer ratio (not a dataclass field): plain
        # int arithmetic in num_global, which torch.compile traces without a graph break
        ratio = Fraction(repr(self.sparse_ratio))
        object.__setattr__(self, "_ratio", (ratio.numerator, ratio.denominator))

    def num_global(self, n_tokens: int) -> int:
        """S = floor(r * N): the size of the shared cross-frequency sample (0 when it is off).

        r is taken as the decimal it prints as, so 0.1 * 8000 is exactly 800 (no float drift).
        """
        if not self.cross_frequency:
            return 0
        num, den = self._ratio
        return num * int(n_tokens) // den

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["freq_bins"] = list(self.freq_bins)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiteFocusConfig:
        if not isinstance(data, dict):
            raise ValueError(f"LiteFocusConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LiteFocusConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        kwargs = dict(data)
        if "freq_bins" in kwargs and isinstance(kwargs["freq_bins"], list):
            kwargs["freq_bins"] = tuple(kwargs["freq_bins"])
        return cls(**kwargs)
