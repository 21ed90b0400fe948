"""The stages of one benchmark row after the UNet steps: the decode alone, then a full generation.

    measure_decode(target, ...) -> decode_* fields: VAE decoder + vocoder on a fixed random latent,
                                   timed, with its peak memory and its working memory (peak - baseline)
    generate(target, ...)       -> generate_s / denoise_s / decode_s: the runtime's own sampling loop

Both go through the target's ``decode`` stage exactly as the runtime calls it (numpy in, numpy out;
``decode_waveform``), so the PyTorch and the engine rows decode through the same API.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from litefocus.bench.measure import PeakMemory, summarize_ms, time_ms
from litefocus.bench.targets import Target
from litefocus.runtime.loader import OpenEntry
from litefocus.runtime.noise_schedule import NoiseSchedule
from litefocus.runtime.options import Conditioning, GenerateOptions
from litefocus.runtime.runtime import generate_audio

GUIDANCE_SCALE = 3.5  # AudioLDM2's default: the CFG pair runs as one batch-2 UNet call
DECODE_FIELDS = ("decode_ms_p50", "decode_ms_all", "decode_peak_mem_mb", "decode_mem_delta_mb")


def measure_decode(target: Target, device: torch.device, warmup: int, repeats: int, seed: int) -> dict:
    """The row's decode stage alone: ``warmup`` untimed + ``repeats`` timed calls on one seeded random
    latent of ``target.decode_contract`` (batch 1, the bucket's frames), after a peak-memory reset.

    ``decode_peak_mem_mb``: the absolute peak since the reset (the row's ``mem_kind``);
    ``decode_mem_delta_mb``: that peak minus what was resident right after the reset (CPU: VmRSS;
    GPU: ``torch.cuda.memory_allocated``; None where the peak is not PyTorch's, i.e. the engine rows
    on a GPU), i.e. the decode's own working memory on top of the weights and whatever else was
    already there. ``repeats`` = 0: nothing runs and the decode_* values are None.
    """
    if repeats == 0:
        return {**dict.fromkeys(DECODE_FIELDS), "decode_warmup": 0, "decode_repeats": 0}
    # the whole bucket's latent, also for a time-chunked decode (whose graph takes one window)
    full = dataclasses.replace(target.decode_contract, window_frames=None, overlap_frames=0)
    inputs = full.numpy_inputs(seed)
    mem = PeakMemory(device, torch_allocator=target.module is not None)
    mem.reset()
    baseline = mem.resident_mb()
    last: list[np.ndarray] = []

    def call() -> None:
        last.clear()  # the previous waveform is not held while the next call runs
        last.append(target.decode(inputs))

    times = time_ms(call, device, warmup, repeats)
    peak = mem.peak_mb()
    if not np.isfinite(last[0]).all():
        raise RuntimeError(f"{target.backend}: the decoded waveform is not finite")
    return {
        "decode_ms_p50": summarize_ms(times)["p50"],
        "decode_ms_all": times,
        "decode_peak_mem_mb": peak,
        "decode_mem_delta_mb": None if peak is None or baseline is None else peak - baseline,
        "decode_warmup": warmup,
        "decode_repeats": repeats,
    }


def generate(
    target: Target, source: str, steps: int, seed: int, progress: bool, scheduler: str = "ddim"
) -> dict:
    """A full generation through the runtime's own ``generate_audio``: ``steps`` sampler steps +
    decode, timed, on random conditioning (random weights have no text encoders)."""
    from litefocus.models import scheduler_config

    c = target.contract
    inputs = c.numpy_inputs(seed)
    cond = Conditioning(  # one guided request: the first two rows
        *(
            inputs[k][:2]
            for k in ("encoder_hidden_states", "encoder_hidden_states_1", "encoder_attention_mask_1")
        )
    )
    options = GenerateOptions(steps=steps, guidance_scale=GUIDANCE_SCALE, scheduler=scheduler, seed=seed)
    entry = OpenEntry(target.unet, target.decode, c, target.decode_contract)
    schedule = NoiseSchedule.from_config(scheduler_config(source))
    audio = generate_audio(entry, cond, c.bucket.exact_seconds, options, schedule, progress=progress)
    if not np.isfinite(audio.waveform).all():
        raise RuntimeError(f"{target.backend}: the generated waveform is not finite")
    t = audio.timings
    return {"generate_s": t["denoise"] + t["decode"], "denoise_s": t["denoise"], "decode_s": t["decode"]}
