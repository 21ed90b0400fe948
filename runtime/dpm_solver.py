"""DPM-Solver++ 2M (multistep, midpoint) in numpy: what diffusers' ``DPMSolverMultistepScheduler``
computes with ``algorithm_type="dpmsolver++"`` and its defaults (solver order 2, final sigma 0,
lower-order final steps), step for step, float32 where diffusers is float32.

    sampler = DPMSolverPP2M(NoiseSchedule.from_config(cfg), steps=25)
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(model_output(x, t), i, x)

The sampler keeps the previous data prediction: one instance per request.
"""

from __future__ import annotations

import numpy as np

from litefocus.runtime.noise_schedule import NoiseSchedule


class DPMSolverPP2M:
    init_noise_sigma = 1.0

    def __init__(self, schedule: NoiseSchedule, steps: int):
        self.schedule, self.steps = schedule, schedule.check_steps(steps)
        self.timesteps = dpm_timesteps(schedule, steps)
        if len(np.unique(self.timesteps)) != steps:  # a zero step size: the solver would divide by 0
            raise ValueError(
                f"steps = {steps} repeats timesteps in DPM-Solver++ ({schedule.num_train_timesteps} training "
                "steps); use fewer steps"
            )
        ac = schedule.alphas_cumprod()
        all_sigmas = np.sqrt((1 - ac) / ac)  # float32
        sigmas = np.interp(self.timesteps, np.arange(len(all_sigmas)), all_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [steps + 1]
        self._previous = None  # the last data prediction
        self._next_index = 0

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def _alpha_sigma(self, index: int) -> tuple[np.float32, np.float32]:
        sigma = self.sigmas[index]
        alpha = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))  # float32, as torch's sigma**2, ** 0.5
        return alpha, sigma * alpha

    def _data_prediction(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(index)
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return (sample - sigma * model_output) / alpha
        if kind == "sample":
            return model_output
        return alpha * sample - sigma * model_output  # v_prediction

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """x_t -> x_{t-1}; steps must come in order (index 0, 1, ...)."""
        if index != self._next_index:
            raise ValueError(
                f"DPM-Solver++ steps run in order: expected step {self._next_index}, got {index}"
            )
        x0 = self._data_prediction(model_output, index, sample)
        last = index == self.steps - 1  # final sigma 0: always first order
        s32 = sample.astype(np.float32)
        alpha_t, sigma_t = self._alpha_sigma(index + 1)
        alpha_s, sigma_s = self._alpha_sigma(index)
        with np.errstate(divide="ignore"):  # log(0) at the final sigma: lambda = +inf, exp(-h) = 0
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s = np.log(alpha_s) - np.log(sigma_s)
        h = lambda_t - lambda_s
        decay = alpha_t * (np.exp(-h) - np.float32(1))
        if self._previous is None or last:
            out = (sigma_t / sigma_s) * s32 - decay * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(index - 1)
            r0 = (lambda_s - (np.log(alpha_s1) - np.log(sigma_s1))) / h
            d1 = (np.float32(1.0) / r0) * (x0 - self._previous)
            out = (sigma_t / sigma_s) * s32 - decay * x0 - np.float32(0.5) * decay * d1
        self._previous = x0
        self._next_index += 1
        return out.astype(model_output.dtype)


def dpm_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing or "linspace"
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = n // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    return np.arange(n, 0, -n / steps).round().astype(np.int64) - 1  # trailing
