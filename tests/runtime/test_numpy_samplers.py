"""The numpy samplers against diffusers' schedulers on whole trajectories: the same model outputs are
fed to both (each computed from that sampler's own current sample), in float64, at 10, 50 and 200
steps; max difference relative to the sample's scale <= 1e-6 at every step up to 50 steps.

At 200 steps the bound is 5e-6. The schedules are bit-identical (tested below), and the samplers use
float32 where diffusers does, but torch's CPU float32 sqrt / log / exp are not correctly rounded (179
of AudioLDM2's 1000 sigmas differ from the correctly rounded value by one ulp), so ~1e-7 per step
accumulates over long trajectories. A real error (a timestep, an order, a coefficient) is >= 1e-3."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from litefocus.runtime.ddim import DDIM
from litefocus.runtime.dpm_solver import DPMSolverPP2M
from litefocus.runtime.noise_schedule import NoiseSchedule

AUDIOLDM2 = json.loads(resources.files("litefocus").joinpath("configs", "scheduler.json").read_text())


def _diffusers(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def _ours(name: str, config: dict, steps: int):
    cls = DDIM if name == "ddim" else DPMSolverPP2M
    return cls(NoiseSchedule.from_config(config), steps)


ALPHAS = NoiseSchedule.from_config(AUDIOLDM2).alphas_cumprod().astype(np.float64)


def _model(x: np.ndarray, t: int, rng_seed: int, prediction: str = "epsilon") -> np.ndarray:
    """A stand-in denoiser with a real one's behaviour: the exact noise prediction for data drawn
    from N(0, 0.5^2) (so trajectories stay O(1), as latents do), plus a small fixed perturbation per
    step (so it is not linear in x)."""
    a = ALPHAS[int(t)]
    eps = np.sqrt(1 - a) * x / (a * 0.25 + 1 - a)
    eps = eps + 0.05 * np.random.default_rng([rng_seed, int(t)]).standard_normal(x.shape)
    if prediction == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0, x0 from x and eps
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        return np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    return eps


@pytest.mark.parametrize("steps", [10, 50, 200])
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_trajectory_matches_diffusers(name, steps, prediction):
    config = {**AUDIOLDM2, "prediction_type": prediction}
    ref = _diffusers(name, config)
    ref.set_timesteps(steps)
    ours = _ours(name, config, steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.init_noise_sigma == ref.init_noise_sigma
    x0 = np.random.default_rng(steps).standard_normal((1, 8, 12, 16))
    x_ref, x_ours = torch.from_numpy(x0.copy()), x0.copy()
    worst, scales = 0.0, []
    for i, t in enumerate(ours.timesteps):
        x_ref = ref.step(torch.from_numpy(_model(x_ref.numpy(), t, 7, prediction)), ref.timesteps[i], x_ref)
        x_ref = x_ref.prev_sample
        x_ours = ours.step(_model(x_ours, t, 7, prediction), i, x_ours)
        assert x_ours.dtype == np.float64 and x_ref.dtype == torch.float64
        scale = np.abs(x_ref.numpy()).max()
        scales.append(scale)
        worst = max(worst, np.abs(x_ours - x_ref.numpy()).max() / scale)
    assert worst <= (1e-6 if steps <= 50 else 5e-6), worst
    assert max(scales) < 10 and np.abs(x_ours).std() < 1.0  # a denoising trajectory, not a blow-up


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_schedule_is_bit_identical_to_diffusers(schedule):
    from diffusers import DDIMScheduler

    for start, end, n in ((0.0015, 0.0195, 1000), (0.00085, 0.012, 1000), (0.0001, 0.02, 1001)):
        config = {**AUDIOLDM2, "beta_schedule": schedule, "beta_start": start, "beta_end": end}
        config["num_train_timesteps"] = n
        ours = NoiseSchedule.from_config(config).alphas_cumprod()
        np.testing.assert_array_equal(ours, DDIMScheduler.from_config(config).alphas_cumprod.numpy())


def test_the_model_scheduler_config_is_read_and_checked():
    s = NoiseSchedule.from_config({**AUDIOLDM2, "_class_name": "DDIMScheduler", "unknown": 1})
    assert s.steps_offset == 1 and s.prediction_type == "epsilon"
    for bad in ({"prediction_type": "flow"}, {"beta_schedule": "squaredcos_cap_v2"}, {"thresholding": True}):
        with pytest.raises(ValueError):
            NoiseSchedule.from_config({**AUDIOLDM2, **bad})
    for steps in (0, 1001, True, 2.0):
        with pytest.raises(ValueError, match="steps"):
            DDIM(s, steps)
    dpm = DPMSolverPP2M(s, 5)
    with pytest.raises(ValueError, match="in order"):
        dpm.step(np.zeros(3), 1, np.zeros(3))


def test_ddim_refuses_steps_whose_timesteps_pass_the_schedule():
    """'leading' spacing + steps_offset 1 at 1000 steps would index timestep 1000 (diffusers itself
    fails there with an IndexError): refused up front with the largest usable count."""
    schedule = NoiseSchedule.from_config(AUDIOLDM2)
    with pytest.raises(ValueError, match="use at most 999 steps"):
        DDIM(schedule, 1000)
    assert DDIM(schedule, 999).timesteps.max() == 999
