"""``Runtime``: load an engine directory once, serve many generations (thread-safe, no global state).

with Runtime.load("engines", device="cuda") as rt:
    audio = rt.generate("rain on a tin roof", seconds=80, seed=1)
    audio = rt.generate("rain", 10, GenerateOptions(steps=50, scheduler="dpm++"))

Torch-free: ONNX Runtime (or TensorRT) graphs, numpy samplers and the ``tokenizers`` library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import threading
import time
from pathlib import Path

from tqdm import tqdm

from litefocus.buckets import MAX_SECONDS, SAMPLE_RATE
from litefocus.engine.backends import RUNTIME_BACKENDS, parse_device
from litefocus.engine.contract import MODULES
from litefocus.engine.entries import Entry, Manifest, load_manifest
from litefocus.engine.manifest import FIX, ManifestError, library_versions
from litefocus.runtime.audio import Audio
from litefocus.runtime.batching import BatchedUNet, decode_waveform, new_slot
from litefocus.runtime.inputs import check_prompt
from litefocus.runtime.loader import BackendOptions, OpenEntry, open_entry
from litefocus.runtime.noise_schedule import NoiseSchedule
from litefocus.runtime.options import Conditioning, GenerateOptions

logger = logging.getLogger(__name__)

# The shortest audio a request may ask for: one sample at 16 kHz (shorter gives no audio at all).
MIN_SECONDS = 1 / SAMPLE_RATE
CLOSED = "the runtime was closed; load it again with Runtime.load"


class Runtime:
    def __init__(
        self,
        engine_dir: Path,
        manifest: Manifest,
        backend: str,
        device: tuple[str, int],
        cuda_graph: bool = False,
    ):
        self.engine_dir = engine_dir
        self.manifest = manifest  # typed; the JSON document is manifest.raw
        self.backend = backend
        self.device = device  # ("cpu", 0) | ("cuda", N)
        self.cuda_graph = cuda_graph  # UNet sessions captured once and replayed (CUDA EP)
        self.config = manifest.litefocus
        self.entries: dict[str, Entry] = dict(manifest.entries)  # by (bucket frames, batch)
        if not self.entries:
            raise ValueError(f"{engine_dir} has no engines; export some with litefocus-export --seconds ...")
        self.schedule = _noise_schedule(manifest.raw)
        self._lock = threading.Lock()
        self._backends: dict[tuple[str, str], object] = {}  # (entry, module) -> opened backend
        self._text = None
        self._closed = False
        self._active = 0  # generations running now: close() waits for them
        self._idle = threading.Condition()
        self._holds = threading.local()  # .depth: this thread's nested holds (a running generation)

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        backend: str = "auto",
        device: str | None = None,
        cuda_graph: bool = False,
    ) -> Runtime:
        """Read and check the manifest; engines open lazily, per bucket, on first use.
        ``device``: "cpu" (default) or "cuda[:N]" (ONNX Runtime's CUDA EP, or TensorRT).
        ``cuda_graph``: each UNet session on the CUDA EP is captured once as a CUDA graph and
        replayed every step (its inputs and output at fixed device addresses; see ``SharedBinding``)."""
        if backend not in RUNTIME_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIME_BACKENDS)}")
        dev = parse_device(device)
        if cuda_graph and dev[0] != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got device {device!r}; add --device cuda")
        engine_dir = Path(engine_dir)
        if engine_dir.exists() and not engine_dir.is_dir():
            raise ValueError(
                f"engine directory {engine_dir} is a file, not a directory; pass the folder litefocus-export wrote"
            )
        if not engine_dir.is_dir():
            raise ValueError(f"engine directory {engine_dir} does not exist; create it with litefocus-export")
        manifest = load_manifest(engine_dir)
        _warn_on_version_drift(manifest)
        if backend == "tensorrt":
            from litefocus.engine.tensorrt_backend import require_tensorrt

            require_tensorrt()  # TensorRTNotInstalled names the package to install
        return cls(engine_dir, manifest, backend, dev, cuda_graph)

    def close(self) -> None:
        """Refuse new work (RuntimeError), wait for the generations running in other threads to
        finish, then release the engines. Idempotent; never call it from inside a generation."""
        if getattr(self._holds, "depth", 0):
            raise RuntimeError("close() inside a generation of this runtime would wait for itself")
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._active == 0)
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()
            if self._text is not None:  # a caller may still hold it (text_encoder()): it is closed too
                self._text.close()
            self._text = None

    @contextlib.contextmanager
    def _in_use(self):
        """A generation's hold on the engines: close() waits until every hold is released. A
        generation that started before close() finishes (its nested calls are not refused)."""
        depth = getattr(self._holds, "depth", 0)
        with self._idle:
            if self._closed and depth == 0:
                raise RuntimeError(CLOSED)
            self._active += 1
        self._holds.depth = depth + 1
        try:
            yield
        finally:
            self._holds.depth = depth
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _check_open(self) -> None:
        """New work after close() is refused; a generation already running goes on."""
        if self._closed and not getattr(self._holds, "depth", 0):
            raise RuntimeError(CLOSED)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- buckets -----------------------------------------------------------------------------
    def bucket_for(self, seconds: float) -> str:
        """The entry of the smallest bucket whose audio holds ``seconds`` (of that bucket's batch
        sizes, the smallest that holds a guided request; ``batch_group`` has them all)."""
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 < seconds < math.inf:
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
        try:
            seconds = float(seconds)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        if seconds < MIN_SECONDS:
            raise ValueError(
                f"seconds = {seconds:g} gives no audio sample at {SAMPLE_RATE} Hz; ask for at least "
                f"{MIN_SECONDS:g} s (one sample)"
            )
        exact = {
            name: e.bucket.exact_seconds for name, e in self.entries.items() if name == self._primary(name)
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

    def buckets(self) -> list[dict]:
        """Each bucket a request can land in, shortest first, from the manifest alone (nothing is
        opened): its entry ``name``, exact ``seconds`` and exported ``batch_sizes``."""
        return [
            {
                "name": name,
                "seconds": e.bucket.exact_seconds,
                "batch_sizes": sorted(self.entries[n].batch for n in self._group_names(name)),
            }
            for name, e in self.entries.items()
            if name == self._primary(name)
        ]

    def entry_for(self, name: str, rows: int) -> str:
        """Of ``name``'s batch sizes, the entry of the smallest that holds ``rows`` (a single request
        opens only that one)."""
        names = self._group_names(name)
        fits = [n for n in names if self.entries[n].batch >= rows]
        if not fits:
            raise ValueError(
                f"bucket {name} has no engine for {rows} rows (batch sizes "
                f"{', '.join(str(self.entries[n].batch) for n in names)}): use guidance_scale=1, or "
                "export --batch 2"
            )
        return min(fits, key=lambda n: self.entries[n].batch)

    def batch_group(self, name: str, modules=MODULES) -> dict[int, OpenEntry]:
        """Batch size -> opened entry, for every entry of ``name``'s bucket and precision
        (``modules=("unet",)``: a denoiser that never decodes opens no decode graphs)."""
        return {self.entries[n].batch: self.open_entry(n, modules) for n in self._group_names(name)}

    def _group_names(self, name: str) -> list[str]:
        if name not in self.entries:
            raise ValueError(f"{self.engine_dir} has no entry {name!r}; it has {', '.join(self.entries)}")
        key = self.entries[name].group_key
        return [n for n, e in self.entries.items() if e.group_key == key]

    def _primary(self, name: str) -> str:
        """The group's entry for one request: the smallest batch >= 2, else the smallest."""
        names = self._group_names(name)
        return next((n for n in names if self.entries[n].batch >= 2), names[0])

    def open_entry(self, name: str, modules=MODULES) -> OpenEntry:
        """(unet backend, decode backend, unet contract, decode contract) of entry ``name``, each
        backend opened once: for embedding the stages in another loop, e.g. the benchmark or a
        serving deployment. A module not in ``modules`` is None (and is not opened)."""
        if name not in self.entries:
            raise ValueError(f"{self.engine_dir} has no entry {name!r}; it has {', '.join(self.entries)}")
        if not set(modules) or set(modules) - set(MODULES):
            raise ValueError(f"modules must name some of {', '.join(MODULES)}, got {modules!r}")
        with self._lock:
            self._check_open()
            missing = tuple(m for m in MODULES if m in modules and (name, m) not in self._backends)
            if missing:
                options = BackendOptions(self.backend, self.device, self.cuda_graph)
                opened = open_entry(self.engine_dir, name, self.manifest, options, missing)
                for m in missing:
                    self._backends[(name, m)] = getattr(opened, m)
            unet = self._backends.get((name, "unet")) if "unet" in modules else None
            decode = self._backends.get((name, "decode")) if "decode" in modules else None
            entry = self.entries[name]
            return OpenEntry(unet, decode, entry.unet.contract, entry.decode.contract)

    # ---- generation --------------------------------------------------------------------------
    def text_encoder(self):
        """The engine directory's text-conditioning engine and tokenizers (opened once)."""
        with self._lock:
            self._check_open()
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
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r:.80}")
        check_prompt(prompt)
        name = self.bucket_for(seconds)  # fail fast, before the text encoders run
        with self._in_use():
            t0 = time.perf_counter()
            cond = self.text_encoder()(prompt, options.negative_prompt, guided=options.guided)
            t_cond = time.perf_counter() - t0
            audio = self._sample(cond, seconds, name, options, progress)
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
        return self._sample(cond, seconds, self.bucket_for(seconds), options, progress)

    def _sample(
        self, cond: Conditioning, seconds: float, name: str, options: GenerateOptions, progress: bool
    ):
        """The sampling loop + decode in bucket ``name`` (``bucket_for(seconds)``, found once per request)."""
        with self._in_use():
            t0 = time.perf_counter()
            entry = self.open_entry(
                self.entry_for(name, 2 if options.guided else 1)
            )  # opened once: the first request pays
            opened = time.perf_counter() - t0
            audio = generate_audio(entry, cond, seconds, options, self.schedule, progress=progress)
        audio = dataclasses.replace(audio, bucket=name)
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
) -> Audio:
    """One request alone: the sampling loop + decode on one bucket's opened backends (Runtime's
    generation, and the benchmark's on any backend). ``cond``: [uncond, cond] when guided, else one
    row; any T5 length <= the engine's. The same slot code as a served batch. The audio's ``bucket``
    is left empty: the caller knows which entry it opened (Runtime names it)."""
    t0 = time.perf_counter()
    unet = BatchedUNet({entry.unet_contract.batch: entry})
    slot = new_slot(cond, options, unet.contract, schedule)
    t1 = time.perf_counter()
    for _ in tqdm(range(slot.steps), desc="denoise", disable=not progress, leave=False):
        unet.step([slot])
    t2 = time.perf_counter()
    wave = decode_waveform(entry.decode, slot.latents, seconds)
    t3 = time.perf_counter()
    return Audio(
        waveform=wave,
        sample_rate=SAMPLE_RATE,
        seconds=seconds,
        bucket="",
        seed=slot.seed,
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
        raise ManifestError(f"manifest.json: $.scheduler: {str(e)[:200]}; {FIX}") from None


def _warn_on_version_drift(manifest: Manifest) -> None:
    """ONNX graphs stay valid across these libraries' releases, so drift is a warning, not an error
    (TensorRT engines, which are tied to one version and GPU, are checked per engine)."""
    now = library_versions()
    drift = [
        f"{k} {v} -> {now.get(k)}"
        for k, v in manifest.versions.items()
        if k in ("litefocus", "onnxruntime") and v != now.get(k)
    ]
    if drift:
        logger.warning(
            "engines were exported with other library versions (%s); re-export if results differ",
            ", ".join(drift),
        )
