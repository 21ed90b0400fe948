"""Step-level batching: many requests, one UNet call per denoising step.

A request is a ``Slot``: its conditioning rows, sampler state, latents and random generator. A
running batch is a list of slots; ``BatchedUNet.step`` runs ONE UNet call for all of them (packed
into the smallest exported batch size that holds their rows, the rest padding) and advances each
slot by one step of its own sampler. Requests join and leave between steps. A slot's noise, its
LiteFocus samples and its sampler state are its own, so its result does not depend on what it was
batched with: the runtime's single-request generation is the same code with one slot.

Every row of an engine call has its own timestep and LiteFocus samples (the UNet contract's
``timestep [B]`` and ``litefocus_indices_f* [B, layers, S]``): that is what makes this possible.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

from litefocus.engine.contract import GPT2_TOKENS
from litefocus.engine.manifest import entry_name
from litefocus.runtime.noise_schedule import NoiseSchedule
from litefocus.runtime.options import Conditioning, GenerateOptions
from litefocus.runtime.sampling import (
    UNetCall,
    draw_step_indices,
    index_specs,
    initial_latents,
    make_sampler,
)


@dataclass(eq=False)
class Slot:
    """One request in a running batch (mutable: ``step`` and ``latents`` advance in place)."""

    cond: Conditioning  # [rows, ...]: [unconditional, conditional] when guided, else [conditional]
    guidance_scale: float
    sampler: object
    latents: np.ndarray  # float32 [1, 8, T, 16]
    rng: np.random.Generator
    seed: int
    step: int = 0
    index_specs: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.cond.batch

    @property
    def steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def model_input(self) -> tuple[np.ndarray, int, dict]:
        """This step's UNet rows: (sample [rows, 8, T, 16], timestep, indices name -> [layers, S]).
        Draws the step's LiteFocus samples from the slot's generator (after its initial noise)."""
        indices = draw_step_indices(self.index_specs, self.rng)
        x = self.sampler.scale_model_input(self.latents, self.step)  # [1, 8, T, 16]
        return np.concatenate([x] * self.rows), int(self.sampler.timesteps[self.step]), indices

    def finish_step(self, noise: np.ndarray) -> None:
        """noise: [rows, 8, T, 16] -> guidance, sampler step, next step."""
        if self.rows == 2:
            uncond, text = noise[:1], noise[1:]
            noise = uncond + np.float32(self.guidance_scale) * (text - uncond)
        self.latents = self.sampler.step(noise, self.step, self.latents)
        self.step += 1


def _entry_of(contract) -> str:
    """The name of the entry a UNet contract belongs to (``10s-fp32``, ``10s-fp32-b4``)."""
    return entry_name(contract.bucket, contract.precision, contract.batch)


def new_slot(
    cond: Conditioning, options: GenerateOptions, contract, schedule: NoiseSchedule, bucket: str = ""
) -> Slot:
    """A request's starting state: conditioning checked and padded to the engine's T5 length, the
    seed drawn when none is given, the initial noise (or ``options.latents``) scaled."""
    if not isinstance(cond, Conditioning):
        raise ValueError(f"cond must be a litefocus.runtime.Conditioning, got {type(cond).__name__}")
    rows = 2 if options.guided else 1
    if cond.batch != rows:
        raise ValueError(
            f"conditioning has batch {cond.batch}; a request takes {rows}: "
            + ("[unconditional, conditional] with guidance" if rows == 2 else "one row without guidance")
        )
    if options.guided and contract.batch == 1:
        raise ValueError("this engine was exported with --batch 1 (no guidance): use guidance_scale=1")
    widths = (cond.gpt2.shape[1:], cond.t5.shape[2])
    if widths != ((GPT2_TOKENS, contract.gpt2_dim), contract.t5_dim):
        raise ValueError(
            f"conditioning has gpt2 {list(cond.gpt2.shape)} and t5 {list(cond.t5.shape)}; this engine takes "
            f"gpt2 [{rows}, {GPT2_TOKENS}, {contract.gpt2_dim}] and t5 [{rows}, <= {contract.text_len}, "
            f"{contract.t5_dim}]"
        )
    cond = cond.padded(contract.text_len)
    seed = secrets.randbits(63) if options.seed is None else options.seed
    rng = np.random.default_rng(seed)
    sampler = make_sampler(options.scheduler, schedule, schedule.check_steps(options.steps))
    shape = (1, *contract.bucket.latent_shape)
    if options.latents is None:
        latents = initial_latents(shape, rng, sampler)
    elif options.latents.shape != shape:
        raise ValueError(
            f"latents have shape {list(options.latents.shape)}; bucket {bucket or _entry_of(contract)} "
            f"takes {list(shape)}"
        )
    else:
        latents = options.latents * np.float32(sampler.init_noise_sigma)
    return Slot(cond, options.guidance_scale, sampler, latents, rng, seed, index_specs=index_specs(contract))


def capacity(sizes: list[int], batching: bool) -> int:
    """The most rows one call takes, given the exported batch sizes (without batching: one request,
    at most 2 rows)."""
    return max(sizes) if batching else min(2, max(sizes))


def pack(slots: list[Slot], sizes: list[int], batching: bool) -> list[list[Slot]]:
    """Slots -> calls: greedy, in order, each call's rows within the largest size (one slot per call
    without batching)."""
    if not batching:
        return [[s] for s in slots]
    calls, rows = [], 0
    for s in slots:
        if not calls or rows + s.rows > sizes[-1]:
            calls.append([])
            rows = 0
        calls[-1].append(s)
        rows += s.rows
    return calls


class BatchedUNet:
    """One bucket's UNet engines of several batch sizes, run one step at a time for many slots.

    ``group``: batch size -> OpenEntry (``Runtime.batch_group``). ``batching=False`` runs one slot
    per call (the benchmark's "off" mode). Not thread-safe: one caller (the denoiser's loop)."""

    def __init__(self, group: dict, batching: bool = True):
        if not group:
            raise ValueError("BatchedUNet needs at least one engine")
        self.sizes = sorted(group)
        self.entries = dict(group)
        self.contract = group[self.sizes[-1]].unet_contract  # the largest: new_slot checks guidance on it
        self.batching = batching
        self._calls: dict[int, UNetCall] = {}
        self._composition: dict[int, list[Slot]] = {}  # size -> the slots whose conditioning is placed
        self.stats = {"calls": 0, "rows_used": 0, "rows_run": 0}

    @property
    def capacity(self) -> int:
        return capacity(self.sizes, self.batching)

    def size_for(self, rows: int) -> int:
        for size in self.sizes:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows do not fit this bucket's largest engine batch ({self.sizes[-1]})")

    def step(self, slots: list[Slot]) -> None:
        """One denoising step for every slot that is not done, in as few UNet calls as fit."""
        active = [s for s in slots if not s.done]
        for call in pack(active, self.sizes, self.batching):
            self._run(call)

    def _run(self, slots: list[Slot]) -> None:
        rows = sum(s.rows for s in slots)
        size = self.size_for(rows)
        unet = self._unet(size, slots)
        inputs = [s.model_input() for s in slots]
        sample = _pad(np.concatenate([x for x, _, _ in inputs]), size)  # [size, 8, T, 16]
        timesteps = _pad(
            np.array([t for s, (_, t, _) in zip(slots, inputs, strict=True) for _ in range(s.rows)]), size
        )
        indices = {  # name -> [size, layers, S]: each request's rows carry its own samples
            name: _pad(
                np.stack(
                    [ix[name] for s, (_, _, ix) in zip(slots, inputs, strict=True) for _ in range(s.rows)]
                ),
                size,
            )
            for name in inputs[0][2]
        }
        noise = unet(sample, timesteps, indices)  # [size, 8, T, 16]
        start = 0
        for s in slots:
            s.finish_step(noise[start : start + s.rows])
            start += s.rows
        self.stats["calls"] += 1
        self.stats["rows_used"] += rows
        self.stats["rows_run"] += size

    def _unet(self, size: int, slots: list[Slot]) -> UNetCall:
        """The size's UNet call with these slots' conditioning placed (once per new composition)."""
        placed = self._composition.get(size)
        if (
            placed is None
            or len(placed) != len(slots)
            or any(a is not b for a, b in zip(placed, slots, strict=True))
        ):
            self._composition.pop(size, None)  # a failed placement is never taken for a good one
            cond = Conditioning(
                *(
                    _pad(np.concatenate([getattr(s.cond, k) for s in slots]), size)
                    for k in ("gpt2", "t5", "t5_mask")
                )
            )
            if size in self._calls:
                self._calls[size].set_conditioning(cond)
            else:
                self._calls[size] = UNetCall(self.entries[size].unet, cond)
            self._composition[size] = list(slots)  # held: a new slot can never pass for a finished one
        return self._calls[size]


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Rows up to ``size`` by repeating the last row (padding rows are computed and dropped)."""
    x = np.asarray(x)
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def decode_waveform(decode, latents: np.ndarray, seconds: float) -> np.ndarray:
    """Final latents [1, 8, T, 16] -> float32 waveform of exactly ``int(seconds * 16000)`` samples.
    A RuntimeError, never audio, when the latents or the waveform hold NaN or infinity."""
    from litefocus.buckets import SAMPLE_RATE

    check_finite("latents", latents)
    wave = decode({"latent": latents})[0]
    wave = np.ascontiguousarray(wave[: int(seconds * SAMPLE_RATE)], dtype=np.float32)
    check_finite("waveform", wave)
    return wave


def check_finite(what: str, x: np.ndarray) -> None:
    """A one-line RuntimeError when a generation's ``what`` holds NaN or infinity (an overflow in
    the engines): such a result is an error, never returned or written as audio."""
    bad = x.size - int(np.isfinite(x).sum())
    if bad:
        raise RuntimeError(
            f"the generation's {what} hold {bad} NaN/infinite values of {x.size} (a numeric overflow in "
            "the engines); nothing was returned: retry with another seed or a lower guidance_scale, or "
            "re-export the engines at fp32"
        )
