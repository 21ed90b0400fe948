"""``Runtime``: load an engine directory once, serve many generations (thread-safe, no global state).

with Runtime.load("engines", device="cuda") as rt:
    audio = rt.generate("rain on a tin roof", seconds=80, seed=1)
    audio = rt.generate("rain", 10, GenerateOptions(steps=50, scheduler="dpm++"))

Torch-free: ONNX Runtime (or TensorRT) graphs, numpy samplers and the ``tokenizers`` library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import secrets
import threading
import time
from pathlib import Path

import numpy as np

from litefocus.engine import manifest as mf
from litefocus.engine.backends import RUNTIME_BACKENDS, parse_device
from litefocus.engine.contract import MAX_SECONDS, SAMPLE_RATE, Bucket, LiteFocusConfig
from litefocus.runtime.audio import Audio
from litefocus.runtime.engines import OpenEntry, open_entry
from litefocus.runtime.noise_schedule import NoiseSchedule
from litefocus.runtime.sampling import (
    Conditioning,
    GenerateOptions,
    UNetCall,
    denoise,
    index_specs,
    initial_latents,
    make_sampler,
)

logger = logging.getLogger(__name__)


class Runtime:
    def __init__(self, engine_dir: Path, manifest: dict, backend: str, device: tuple[str, int]):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.backend = backend
        self.device = device  # ("cpu", 0) | ("cuda", N)
        cfg = manifest["litefocus"]
        self.config = None if cfg is None else LiteFocusConfig.from_dict(cfg)
        entries = sorted(manifest["entries"].items(), key=lambda kv: kv[1]["bucket"]["frames"])
        self.entries = dict(entries)
        if not self.entries:
            raise ValueError(f"{engine_dir} has no engines; export some with litefocus-export --seconds ...")
        self.schedule = _noise_schedule(manifest)
        self._lock = threading.Lock()
        self._open: dict[str, OpenEntry] = {}
        self._text = None

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", device: str | None = None) -> Runtime:
        """Read and check the manifest; engines open lazily, per bucket, on first use.
        ``device``: "cpu" (default) or "cuda[:N]" (ONNX Runtime's CUDA EP, or TensorRT)."""
        if backend not in RUNTIME_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIME_BACKENDS)}")
        dev = parse_device(device)
        engine_dir = Path(engine_dir)
        if engine_dir.exists() and not engine_dir.is_dir():
            raise ValueError(
                f"engine directory {engine_dir} is a file, not a directory; pass the folder litefocus-export wrote"
            )
        if not engine_dir.is_dir():
            raise ValueError(f"engine directory {engine_dir} does not exist; create it with litefocus-export")
        manifest = mf.read_manifest(engine_dir)
        _warn_on_version_drift(manifest)
        if backend == "tensorrt":
            from litefocus.engine.tensorrt_backend import require_tensorrt

            require_tensorrt()  # TensorRTNotInstalled names the package to install
        return cls(engine_dir, manifest, backend, dev)

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                entry.close()
            self._open.clear()
            self._text = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- buckets -----------------------------------------------------------------------------
    def bucket_for(self, seconds: float) -> str:
        """The smallest entry whose audio holds ``seconds``."""
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 < seconds < math.inf:
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
        seconds = float(seconds)
        exact = {
            name: Bucket(e["bucket"]["seconds"], e["bucket"]["frames"]).exact_seconds
            for name, e in self.entries.items()
        }
        for name, length in exact.items():  # every length follows from frames, never from a stored float
            if length >= seconds:
                return name
        have = ", ".join(f"{x:g} s" for x in exact.values())
        if seconds > MAX_SECONDS:
            raise ValueError(
                f"seconds = {seconds:g} is longer than the largest bucket in {self.engine_dir} ({have}) and than "
                f"the {MAX_SECONDS:g} s that litefocus-export builds; generate shorter pieces"
            )
        raise ValueError(
            f"seconds = {seconds:g} is longer than the largest bucket in {self.engine_dir} ({have}); export a "
            f"longer one: litefocus-export --seconds {math.ceil(seconds)} --out {self.engine_dir}"
        )

    def open_entry(self, name: str) -> OpenEntry:
        """(unet backend, decode backend, unet contract, decode contract) of entry ``name``, opened
        once: for embedding the stages in another loop, e.g. the benchmark."""
        if name not in self.entries:
            raise ValueError(f"{self.engine_dir} has no entry {name!r}; it has {', '.join(self.entries)}")
        with self._lock:
            if name not in self._open:
                self._open[name] = open_entry(
                    self.engine_dir, name, self.entries[name], self.config, self.backend, self.device
                )
            return self._open[name]

    # ---- generation --------------------------------------------------------------------------
    def text_encoder(self):
        """The engine directory's text-conditioning engine and tokenizers (opened once)."""
        with self._lock:
            if self._text is None:
                from litefocus.runtime.text import TextEncoder

                device = f"cuda:{self.device[1]}" if self.device[0] == "cuda" else "cpu"
                self._text = TextEncoder.load(self.engine_dir, self.manifest, device=device)
            return self._text

    def generate(
        self,
        prompt: str,
        seconds: float,
        options: GenerateOptions | None = None,
        *,
        progress: bool = True,
        **overrides,
    ) -> Audio:
        """Text -> audio of exactly ``int(seconds * 16000)`` samples (AudioLDM2's defaults).
        ``overrides``: GenerateOptions fields (steps=..., seed=...) on top of ``options``."""
        options = _options(options, overrides)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        self.bucket_for(seconds)  # fail fast, before the text encoders run
        t0 = time.perf_counter()
        cond = self.text_encoder()(prompt, options.negative_prompt, guided=options.guided)
        t_cond = time.perf_counter() - t0
        audio = self.generate_from_conditioning(cond, seconds, options, progress=progress)
        audio.timings["conditioning"] = t_cond
        return audio

    def generate_from_conditioning(
        self,
        cond: Conditioning,
        seconds: float,
        options: GenerateOptions | None = None,
        *,
        progress: bool = True,
        **overrides,
    ) -> Audio:
        """Sampling loop + decode from precomputed conditioning (CFG-batched: [uncond, cond])."""
        options = _options(options, overrides)
        if not isinstance(cond, Conditioning):
            raise ValueError(f"cond must be a litefocus.runtime.Conditioning, got {type(cond).__name__}")
        name = self.bucket_for(seconds)
        t0 = time.perf_counter()
        entry = self.open_entry(name)  # opened once per bucket: the first request pays for it
        opened = time.perf_counter() - t0
        audio = generate_audio(entry, cond, seconds, options, self.schedule, progress=progress, bucket=name)
        audio.timings["setup"] += opened
        return audio


def generate_audio(
    entry: OpenEntry,
    cond: Conditioning,
    seconds: float,
    options: GenerateOptions,
    schedule: NoiseSchedule,
    *,
    progress: bool = True,
    bucket: str = "",
) -> Audio:
    """The sampling loop + decode on one bucket's opened backends (Runtime's generation, and the
    benchmark's on any backend). ``cond``: [uncond, cond] when guided, any T5 length <= the engine's."""
    t0 = time.perf_counter()
    unet, decode, unet_c, _ = entry
    prompts = max(1, unet_c.batch // 2)  # CFG engines take [unconditional, conditional] per prompt
    if options.guided and unet_c.batch == 1:
        raise ValueError("this engine was exported with --batch 1 (no guidance): use guidance_scale=1")
    if cond.batch not in (prompts, 2 * prompts) or (options.guided and cond.batch != 2 * prompts):
        raise ValueError(
            f"conditioning has batch {cond.batch}; this engine takes {prompts} prompt(s): batch "
            f"{2 * prompts} with guidance ([unconditional, conditional]) or {prompts} without"
        )
    cond = cond.padded(unet_c.text_len)
    if cond.batch < unet_c.batch:  # unguided on a CFG engine: run the pair, keep one half
        cond = cond.repeated(unet_c.batch // cond.batch)
    seed = secrets.randbits(63) if options.seed is None else options.seed
    rng = np.random.default_rng(seed)
    sampler = make_sampler(options.scheduler, schedule, schedule.check_steps(options.steps))
    shape = (prompts, *unet_c.bucket.latent_shape)
    if options.latents is None:
        latents = initial_latents(shape, rng, sampler)
    elif options.latents.shape != shape:
        raise ValueError(
            f"latents have shape {list(options.latents.shape)}; bucket {bucket} takes {list(shape)}"
        )
    else:
        latents = options.latents * np.float32(sampler.init_noise_sigma)
    t1 = time.perf_counter()
    latents = denoise(
        UNetCall(unet, cond),
        sampler,
        latents,
        cond.batch,
        guidance_scale=options.guidance_scale,
        index_specs=index_specs(unet_c),
        rng=rng,
        progress=progress,
    )
    t2 = time.perf_counter()
    wave = decode({"latent": latents})[0]
    t3 = time.perf_counter()
    samples = int(seconds * SAMPLE_RATE)
    return Audio(
        waveform=np.ascontiguousarray(wave[:samples], dtype=np.float32),
        sample_rate=SAMPLE_RATE,
        seconds=seconds,
        bucket=bucket,
        seed=seed,
        timings={"setup": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2},
    )


def _options(options: GenerateOptions | None, overrides: dict) -> GenerateOptions:
    options = options if options is not None else GenerateOptions()
    if not isinstance(options, GenerateOptions):
        raise ValueError(f"options must be a GenerateOptions, got {type(options).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GenerateOptions)})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; GenerateOptions has {_option_names()}")
    return dataclasses.replace(options, **overrides) if overrides else options


def _option_names() -> str:
    return ", ".join(f.name for f in dataclasses.fields(GenerateOptions))


def _noise_schedule(manifest: dict) -> NoiseSchedule:
    """The model's scheduler config, as the export recorded it (else AudioLDM2's shipped defaults)."""
    config = manifest.get("scheduler")
    if config is None:
        from importlib import resources

        config = json.loads(resources.files("litefocus").joinpath("configs", "scheduler.json").read_text())
    try:
        return NoiseSchedule.from_config(config)
    except (TypeError, ValueError) as e:
        raise mf.ManifestError(f"manifest.json: $.scheduler: {str(e)[:200]}; {mf.FIX}") from None


def _warn_on_version_drift(manifest: dict) -> None:
    """ONNX graphs stay valid across these libraries' releases, so drift is a warning, not an error
    (TensorRT engines, which are tied to one version and GPU, are checked per engine)."""
    now = mf.library_versions()
    drift = [
        f"{k} {v} -> {now.get(k)}"
        for k, v in manifest.get("versions", {}).items()
        if k in ("litefocus", "onnxruntime") and v != now.get(k)
    ]
    if drift:
        logger.warning(
            "engines were exported with other library versions (%s); re-export if results differ",
            ", ".join(drift),
        )
