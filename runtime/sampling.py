"""The sampling loop as small pure stages, in numpy: the sampler, initial noise, LiteFocus samples, one UNet call.

The UNet is a backend of ``litefocus.engine.backends`` (ONNX Runtime, TensorRT or the PyTorch
reference) driven through ``UNetCall``: the conditioning is placed once per request (IO binding on
ONNX Runtime: buffers on the session's device), each step sets the latents, timestep and LiteFocus
indices and reads back the noise prediction. Classifier-free guidance runs as ONE batched call,
[unconditional, conditional], as diffusers does. All randomness (initial noise, then the LiteFocus
global samples step by step) comes from one ``numpy.random.Generator`` seeded per request.
"""

from __future__ import annotations

import numpy as np

from litefocus.engine.contract import index_input_name
from litefocus.runtime.ddim import DDIM
from litefocus.runtime.dpm_solver import DPMSolverPP2M
from litefocus.runtime.noise_schedule import NoiseSchedule
from litefocus.runtime.options import SCHEDULERS, Conditioning


def make_sampler(name: str, schedule: NoiseSchedule, steps: int):
    """A fresh sampler per request (DPM-Solver++ keeps state between steps)."""
    if name == "ddim":
        return DDIM(schedule, steps)
    if name == "dpm++":
        return DPMSolverPP2M(schedule, steps)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def initial_latents(shape: tuple[int, ...], rng: np.random.Generator, sampler) -> np.ndarray:
    """Gaussian noise scaled by the sampler's initial sigma (diffusers' prepare_latents): float32."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sampler.init_noise_sigma)


def index_specs(contract) -> dict[str, tuple[int, int, int]]:
    """Input name -> (layers, S, N) of each LiteFocus index input of a UNet contract (empty if none)."""
    b, cfg = contract.bucket, contract.litefocus
    return {
        index_input_name(f): (layers, b.num_global(cfg, f), b.tokens(f))
        for f, layers in contract.index_levels
    }


def draw_step_indices(specs: dict[str, tuple[int, int, int]], rng: np.random.Generator) -> dict:
    """One step's LiteFocus global samples: name -> int32 [layers, S], S distinct tokens of N per row."""
    return {
        name: np.stack([rng.permutation(n)[:s] for _ in range(layers)]).astype(np.int32)
        for name, (layers, s, n) in specs.items()
    }


class UNetCall:
    """UNet calls on ``backend`` with one conditioning placed (IO binding where the backend has it:
    set once, reused every step), then per step ``(sample, timesteps, indices) -> noise_pred`` (float32).
    ``timesteps``: one per row [B], or one number for every row; ``indices``: name -> [B, layers, S],
    or [layers, S] for every row."""

    def __init__(self, backend, cond: Conditioning):
        self._backend = backend
        self._shapes = backend.contract.shapes()
        bind = getattr(backend, "bind", None)
        self._binding = bind() if bind is not None else None
        self.set_conditioning(cond)

    def set_conditioning(self, cond: Conditioning) -> None:
        fixed = {
            "encoder_hidden_states": cond.gpt2,
            "encoder_hidden_states_1": cond.t5,
            "encoder_attention_mask_1": cond.t5_mask,
        }
        if self._binding is not None:
            for name, value in fixed.items():
                self._binding.set(name, value)
            fixed = {}
        self._fixed = fixed

    def __call__(self, sample: np.ndarray, timesteps, indices: dict) -> np.ndarray:
        step = {"sample": sample, "timestep": np.asarray(timesteps, np.float32)}
        step.update(indices)
        step = {k: _per_row(v, self._shapes[k]) for k, v in step.items()}
        if self._binding is not None:
            return self._binding(step)
        return self._backend({**self._fixed, **step})


def _per_row(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A value shared by every row, broadcast to the contract's per-row shape (others unchanged)."""
    value = np.asarray(value)
    return value if value.shape == tuple(shape) else np.broadcast_to(value, shape)
