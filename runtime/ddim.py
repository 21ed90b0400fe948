"""DDIM (eta = 0) in numpy: what diffusers' ``DDIMScheduler`` computes, step for step.

sampler = DDIM(NoiseSchedule.from_config(cfg), steps=200)
for i, t in enumerate(sampler.timesteps):
    x = sampler.step(model_output(x, t), i, x)
"""

from __future__ import annotations

import numpy as np

from litefocus.runtime.noise_schedule import NoiseSchedule


class DDIM:
    init_noise_sigma = 1.0

    def __init__(self, schedule: NoiseSchedule, steps: int):
        self.schedule, self.steps = schedule, schedule.check_steps(steps)
        self.alphas_cumprod = schedule.alphas_cumprod()
        self.final_alpha_cumprod = np.float32(1.0) if schedule.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = ddim_timesteps(schedule, steps)
        if self.timesteps.max() >= schedule.num_train_timesteps:  # "leading" + steps_offset at n steps
            usable = next(
                k
                for k in range(steps, 0, -1)
                if ddim_timesteps(schedule, k).max() < schedule.num_train_timesteps
            )
            raise ValueError(
                f"steps = {steps} puts a DDIM timestep past the model's {schedule.num_train_timesteps} "
                f"(steps_offset {schedule.steps_offset}); use at most {usable} steps"
            )

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """x_t -> x_{t-1} at ``timesteps[index]`` (scalars in float32, as diffusers)."""
        s = self.schedule
        t = int(self.timesteps[index])
        prev_t = t - s.num_train_timesteps // self.steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = np.float32(1) - a_t
        sa, sb = np.sqrt(a_t), np.sqrt(b_t)  # float32 scalars, as diffusers
        if s.prediction_type == "epsilon":
            x0 = (sample - sb * model_output) / sa
            eps = model_output
        elif s.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / sb
        else:  # v_prediction
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if s.clip_sample:
            x0 = np.clip(x0, -s.clip_sample_range, s.clip_sample_range)
        return np.sqrt(a_prev) * x0 + np.sqrt(np.float32(1) - a_prev) * eps


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing or "leading"
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1  # trailing
