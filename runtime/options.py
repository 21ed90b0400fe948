"""What a request asks for: ``GenerateOptions`` (how to sample) and ``Conditioning`` (the text
encoders' output the UNet takes), each checked once, when it is built.

Every bound here keeps a bad or hostile value from turning into NaN audio or an overflow deep in a
graph: the error names the value and the accepted range at the caller's line instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from litefocus.runtime.inputs import check_prompt

SCHEDULERS = ("ddim", "dpm++")
SEED_LIMIT = 2**63
# Guidance scales in use are 1-20 (AudioLDM2's default is 3.5); far larger ones only amplify the
# difference of two noise predictions into overflow (1e308 gives NaN audio).
MAX_GUIDANCE = 100.0
# Text-encoder states are O(1)-O(100) (layer-normed GPT-2 / T5 outputs); values past this bound come
# from a bug or an attack and overflow float32 inside attention (3e38 gives NaN audio).
MAX_CONDITIONING = 1e4
# The initial noise is a standard normal draw (|x| < ~6); this bound leaves room for any scaling.
MAX_LATENT = 1e4


@dataclass(frozen=True)
class GenerateOptions:
    """How to sample one request; checked once, here. ``latents``: the initial noise [B, 8, T, 16]
    (diffusers' ``latents=``; scaled by the sampler's initial sigma), else drawn from ``seed``."""

    steps: int = 200
    guidance_scale: float = 3.5
    scheduler: str = "ddim"
    seed: int | None = None
    negative_prompt: str | None = None
    latents: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        s = self.steps
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"steps must be an int >= 1, got {s!r}")
        g = self.guidance_scale
        # comparisons, not math.isfinite / float(): an int past a float's range would raise OverflowError
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not g >= 1:
            raise ValueError(f"guidance_scale must be a number >= 1 (1 = no guidance), got {g!r:.80}")
        if not g <= MAX_GUIDANCE:
            shown = f"{g:g}" if g < 1e300 else "inf" if g == math.inf else "(a huge number)"
            raise ValueError(
                f"guidance_scale {shown} is above the maximum {MAX_GUIDANCE:g}; use 1-20 (the default is 3.5)"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT
        ):
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {self.negative_prompt!r}")
        if self.negative_prompt is not None:
            check_prompt(self.negative_prompt, "negative_prompt")
        if self.negative_prompt is not None and not g > 1:
            raise ValueError(
                f"negative_prompt {self.negative_prompt[:40]!r} has no effect at guidance_scale {g}: "
                "use guidance_scale > 1, or drop the negative prompt"
            )
        if self.latents is not None:
            x = np.asarray(self.latents)
            if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
                raise ValueError(
                    f"latents must be a float array [B, 8, T, 16], got {x.dtype} {list(x.shape)}"
                )
            _check_bounded("latents", x, MAX_LATENT)
            object.__setattr__(self, "latents", x.astype(np.float32))
        object.__setattr__(self, "steps", int(s))
        object.__setattr__(self, "guidance_scale", float(g))

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning for one prompt, CFG-batched as [negative/unconditional, prompt] when guided.

    gpt2: float32 [B, 8, D_gpt2]; t5: float32 [B, L, D_t5]; t5_mask: int32 [B, L] (1 = token, 0 = padding).
    """

    gpt2: np.ndarray
    t5: np.ndarray
    t5_mask: np.ndarray

    def __post_init__(self) -> None:
        gpt2, t5, mask = (np.asarray(x) for x in (self.gpt2, self.t5, self.t5_mask))
        if gpt2.ndim != 3 or t5.ndim != 3 or mask.ndim != 2:
            raise ValueError(
                f"conditioning must be gpt2 [B, 8, D], t5 [B, L, D], t5_mask [B, L]; got "
                f"{list(gpt2.shape)}, {list(t5.shape)}, {list(mask.shape)}"
            )
        if not (gpt2.shape[0] == t5.shape[0] == mask.shape[0]) or t5.shape[1] != mask.shape[1]:
            raise ValueError(
                f"conditioning batch/length mismatch: {list(gpt2.shape)}, {list(t5.shape)}, {list(mask.shape)}"
            )
        for name, x in (("gpt2", gpt2), ("t5", t5), ("t5_mask", mask)):
            if x.dtype.kind not in "biuf":
                raise ValueError(f"conditioning {name} must be a real number array, got dtype {x.dtype}")
        _check_bounded("conditioning values (gpt2)", gpt2, MAX_CONDITIONING)
        _check_bounded("conditioning values (t5)", t5, MAX_CONDITIONING)
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("t5_mask must hold only 0 (padding) and 1 (token)")
        object.__setattr__(self, "gpt2", gpt2.astype(np.float32, copy=False))
        object.__setattr__(self, "t5", t5.astype(np.float32, copy=False))
        object.__setattr__(self, "t5_mask", mask.astype(np.int32, copy=False))

    @property
    def batch(self) -> int:
        return self.gpt2.shape[0]

    def padded(self, length: int) -> Conditioning:
        """The T5 sequence zero-padded (mask 0) to the engine's fixed length."""
        b, n, d = self.t5.shape
        if n > length:
            raise ValueError(f"T5 conditioning has {n} tokens, the engine takes at most {length}")
        if n == length:
            return self
        t5 = np.concatenate([self.t5, np.zeros((b, length - n, d), np.float32)], axis=1)
        mask = np.concatenate([self.t5_mask, np.zeros((b, length - n), np.int32)], axis=1)
        return Conditioning(self.gpt2, t5, mask)

    def repeated(self, times: int) -> Conditioning:
        return Conditioning(*(np.concatenate([x] * times) for x in (self.gpt2, self.t5, self.t5_mask)))


def _check_bounded(name: str, x: np.ndarray, bound: float) -> None:
    """A one-line ValueError unless every value of ``x`` is finite and within +-``bound``."""
    if x.size == 0:
        return
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinity; pass finite values")
    peak = float(np.abs(x).max())
    if peak > bound:
        raise ValueError(
            f"{name} contain a value of magnitude {peak:.3g}, above the bound {bound:g}; check their source"
        )
