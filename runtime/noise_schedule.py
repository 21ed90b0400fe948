"""The diffusion noise schedule of a model, from its ``scheduler_config.json``, in numpy.

Shared by the numpy samplers (``ddim.py``, ``dpm_solver.py``). It follows diffusers' float32
arithmetic where diffusers uses it (betas, cumulative alphas, sigmas), so a sampler fed the same
model outputs walks the same trajectory as diffusers' scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# From an untrusted manifest: models train on 1000 timesteps; 10**9 would allocate gigabytes per request.
MAX_TRAIN_TIMESTEPS = 100_000
SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str | None = None  # None: each sampler's own default (DDIM leading, DPM linspace)

    def __post_init__(self) -> None:
        kinds = {"steps_offset": int, "set_alpha_to_one": bool, "clip_sample": bool}
        kinds.update(dict.fromkeys(("beta_start", "beta_end", "clip_sample_range"), float))
        for name, kind in kinds.items():  # from an untrusted manifest: types first
            value = getattr(self, name)
            ok = (
                isinstance(value, bool)
                if kind is bool
                else (
                    isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
                )
            )
            if not ok or (kind is float and not math.isfinite(value)):
                raise ValueError(
                    f"{name} must be a{'n' if kind is int else ''} {kind.__name__}, got {value!r}"
                )
        if self.steps_offset < 0 or self.clip_sample_range <= 0:
            raise ValueError(
                f"need steps_offset >= 0 and clip_sample_range > 0, got {self.steps_offset}, {self.clip_sample_range}"
            )
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not supported; use linear or scaled_linear"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing not in (None, *SPACINGS):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r}: use one of {', '.join(SPACINGS)}")
        n = self.num_train_timesteps
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 < n <= MAX_TRAIN_TIMESTEPS):
            raise ValueError(f"num_train_timesteps must be an int in [2, {MAX_TRAIN_TIMESTEPS}], got {n!r}")
        if self.steps_offset >= n:  # every timestep would lie past the schedule
            raise ValueError(f"steps_offset {self.steps_offset} must be below num_train_timesteps {n}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """From a diffusers scheduler config (unknown keys ignored; unsupported features refused)."""
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(key):
                raise ValueError(f"scheduler config: {key} is not supported by litefocus's samplers")
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: trained_betas is not supported by litefocus's samplers")
        names = cls.__dataclass_fields__
        defaulted = set(config.get("_use_default_values") or ())  # diffusers: not the model's own choice
        return cls(**{k: v for k, v in config.items() if k in names and k not in defaulted})

    def check_steps(self, steps: int) -> int:
        """``steps`` if it is a usable number of sampling steps for this schedule, else ValueError."""
        if (
            isinstance(steps, bool)
            or not isinstance(steps, int)
            or not 1 <= steps <= self.num_train_timesteps
        ):
            raise ValueError(f"steps must be an int in [1, {self.num_train_timesteps}], got {steps!r}")
        return steps

    def alphas_cumprod(self) -> np.ndarray:
        """[num_train_timesteps] float32, as diffusers computes it."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = linspace32(self.beta_start, self.beta_end, n)
        else:
            betas = linspace32(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        # torch's CPU cumprod accumulates float32 in double: so does this
        return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace as torch.linspace computes it on CPU: a float32 step, the first half counted
    from ``start`` and the second back from ``end``, each value one fused multiply-add (emulated
    exactly in float64), so the schedule is bit-identical to diffusers'."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    idx = np.arange(n)
    head = (np.float64(start32) + step * idx).astype(np.float32)
    tail = (np.float64(end32) - step * (n - 1 - idx)).astype(np.float32)
    return np.where(idx < n // 2, head, tail)
