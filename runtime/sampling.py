"""The sampling loop as small pure stages: scheduler, initial noise, one denoising step, the loop.

The UNet is passed in as a callable ``unet(inputs: dict[str, Tensor]) -> noise_pred`` whose inputs
are the export contract's (so PyTorch, ONNX Runtime and TensorRT backends are interchangeable).
Classifier-free guidance runs as ONE batched call: [unconditional, conditional], as diffusers does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from litefocus.engine.contract import index_input_name
from litefocus.install import draw_global_indices

logger = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "dpm++")


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning for one prompt, CFG-batched as [negative/unconditional, prompt] when guided.

    gpt2: [B, 8, D_gpt2]; t5: [B, L, D_t5]; t5_mask: [B, L] (1 = token, 0 = padding).
    """

    gpt2: torch.Tensor
    t5: torch.Tensor
    t5_mask: torch.Tensor

    @property
    def batch(self) -> int:
        return self.gpt2.shape[0]


def make_scheduler(name: str, config: dict):
    """A fresh scheduler per request (schedulers are stateful), configured from the model's config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def initial_latents(shape: tuple[int, ...], generator: torch.Generator, scheduler) -> torch.Tensor:
    """Gaussian noise scaled by the scheduler's initial sigma (diffusers' prepare_latents)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma


def scheduler_config(source: str) -> dict:
    """The scheduler config of a model source: its own (a local directory or a hub id), else the
    AudioLDM2 DDIM defaults shipped with litefocus (random weights, or a hub model without one)."""
    import json
    from importlib import resources
    from pathlib import Path

    path = Path(source) / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not source.startswith("random:"):  # a hub model: its own scheduler config
        from diffusers import DDIMScheduler

        try:
            return dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
        except OSError as e:
            logger.warning("no scheduler config for %s (%s); using AudioLDM2's DDIM defaults", source, e)
    return json.loads(resources.files("litefocus").joinpath("configs", "scheduler.json").read_text())


def index_specs(contract) -> dict[str, tuple[int, int, int]]:
    """Input name -> (layers, S, N) of each LiteFocus index input of a UNet contract (empty if none)."""
    b, cfg = contract.bucket, contract.litefocus
    return {
        index_input_name(f): (layers, b.num_global(cfg, f), b.tokens(f))
        for f, layers in contract.index_levels
    }


def draw_step_indices(index_specs: dict[str, tuple[int, int, int]], generator: torch.Generator) -> dict:
    """One step's LiteFocus global samples: name -> int32 [layers, S], rows drawn layer by layer.

    ``index_specs``: input name -> (layers, S, N). With one LiteFocus level this is the order in which
    the PyTorch processors draw their own samples; every backend gets these same indices.
    """
    out = {}
    for name, (layers, s, n) in index_specs.items():
        out[name] = torch.stack([draw_global_indices(generator, n, s) for _ in range(layers)]).to(torch.int32)
    return out


def denoise_step(
    unet: Callable[[dict], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    indices: dict,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_t -> x_{t-1}: one (CFG-batched) UNet call, guidance, scheduler step.

    The conditioning batch is a multiple of the latent batch (2x with guidance: [uncond, cond]).
    """
    guided = guidance_scale > 1.0
    model_in = torch.cat([latents] * (cond.batch // latents.shape[0]))  # [B, 8, T, 16]
    model_in = scheduler.scale_model_input(model_in, t)
    noise = unet(
        {
            "sample": model_in.to(dtype),
            "timestep": t.reshape(1).to(torch.float32),
            "encoder_hidden_states": cond.gpt2.to(dtype),
            "encoder_hidden_states_1": cond.t5.to(dtype),
            "encoder_attention_mask_1": cond.t5_mask.to(torch.int32),
            **indices,
        }
    ).to(torch.float32)
    if guided:
        uncond, text = noise.chunk(2)
        noise = uncond + guidance_scale * (text - uncond)
    else:
        noise = noise[: latents.shape[0]]
    return scheduler.step(noise, t, latents).prev_sample


def denoise(
    unet,
    scheduler,
    latents,
    cond,
    *,
    steps,
    guidance_scale,
    index_specs,
    generator,
    dtype=torch.float32,
    progress=True,
) -> torch.Tensor:
    """The whole loop; LiteFocus indices are drawn per step from ``generator`` (after the noise)."""
    scheduler.set_timesteps(steps)
    for t in tqdm(scheduler.timesteps, desc="denoise", disable=not progress, leave=False):
        indices = draw_step_indices(index_specs, generator)
        latents = denoise_step(unet, scheduler, latents, t, cond, guidance_scale, indices, dtype)
    return latents
