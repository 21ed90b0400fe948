"""``Runtime``: load an engine directory once, serve many generations (thread-safe, no global state).

with Runtime.load("engines") as rt:
    audio = rt.generate("rain on a tin roof", seconds=80, seed=1)
"""

from __future__ import annotations

import logging
import math
import numbers
import secrets
import threading
import time
from pathlib import Path

import torch

from litefocus.buckets import MAX_SECONDS, SAMPLE_RATE, Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine import manifest as mf
from litefocus.engine.contract import DecodeContract, UNetContract, index_input_name
from litefocus.runtime.audio import Audio
from litefocus.runtime.sampling import (
    SCHEDULERS,
    Conditioning,
    denoise,
    index_specs,
    initial_latents,
    make_scheduler,
    scheduler_config,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def _contracts(entry: dict, config: LiteFocusConfig | None) -> tuple[UNetContract, DecodeContract]:
    """Rebuild the entry's contracts and check them against what the manifest recorded."""
    try:
        return _rebuild_contracts(entry, config)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, mf.ManifestError):
            raise
        raise mf.ManifestError(
            f"the manifest's contracts are not this litefocus version's ({type(e).__name__}: {str(e)[:120]}); "
            "re-export with litefocus-export --force"
        ) from None


def _rebuild_contracts(entry: dict, config: LiteFocusConfig | None) -> tuple[UNetContract, DecodeContract]:
    b = entry["bucket"]
    bucket = Bucket(seconds=b["seconds"], frames=b["frames"])
    u = entry["modules"]["unet"]["contract"]
    shapes = {s["name"]: s["shape"] for s in u["inputs"]}
    levels = tuple(
        (f, shapes[index_input_name(f)][0])
        for f in (config.freq_bins if config else ())
        if index_input_name(f) in shapes
    )
    unet = UNetContract(
        bucket,
        batch=u["batch"],
        text_len=u["text_len"],
        gpt2_dim=shapes["encoder_hidden_states"][2],
        t5_dim=shapes["encoder_hidden_states_1"][2],
        precision=u["precision"],
        litefocus=config,
        index_levels=levels,
    )
    d = entry["modules"]["decode"]["contract"]
    decode = DecodeContract(bucket, batch=d["batch"], precision=d["precision"])
    if unet.to_dict() != u or decode.to_dict() != d:
        raise mf.ManifestError(
            "the manifest's contracts do not match this litefocus version's; re-export with litefocus-export --force"
        )
    return unet, decode


class Runtime:
    def __init__(self, engine_dir: Path, manifest: dict, backend: str, device: torch.device):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.backend = backend
        self.device = device
        cfg = manifest["litefocus"]
        self.config = None if cfg is None else LiteFocusConfig.from_dict(cfg)
        entries = sorted(manifest["entries"].items(), key=lambda kv: kv[1]["bucket"]["frames"])
        self.entries = dict(entries)
        if not self.entries:
            raise ValueError(f"{engine_dir} has no engines; export some with litefocus-export --seconds ...")
        self._lock = threading.Lock()
        self._torch_lock = threading.Lock()  # one UNet + LiteFocus handle is shared by every bucket
        self._open: dict[str, tuple] = {}
        self._models: dict[torch.dtype, tuple] = {}  # torch backend: (unet, handle, vae, vocoder) per dtype
        self._text = None

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls, engine_dir: str | Path, backend: str = "auto", device: str | torch.device | None = None
    ) -> Runtime:
        """Read and check the manifest; engines open lazily, per bucket, on first use."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
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
            from litefocus.export.tensorrt_build import require_tensorrt

            require_tensorrt()  # TensorRTNotInstalled names the package to install
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(engine_dir, manifest, backend, dev)

    def close(self) -> None:
        with self._lock:
            for unet, decode, *_ in self._open.values():
                unet.close()
                decode.close()
            self._open.clear()
            self._models, self._text = {}, None

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

    def open_entry(self, name: str):
        """(unet backend, decode backend, unet contract, decode contract) of entry ``name`` (as
        ``litefocus.export.pipeline.entry_name`` names it), opened once: for embedding the stages in
        another loop, e.g. the benchmark."""
        if name not in self.entries:
            raise ValueError(f"{self.engine_dir} has no entry {name!r}; it has {', '.join(self.entries)}")
        return self._engines(name)

    def _engines(self, name: str):
        """(unet backend, decode backend, unet contract, decode contract) of an entry, opened once."""
        with self._lock:
            if name not in self._open:
                entry = self.entries[name]
                problems = mf.verify_entry(self.engine_dir, entry)
                if problems:
                    raise ValueError(
                        f"engine {name} in {self.engine_dir} failed verification: {'; '.join(problems)}; "
                        "re-export it with litefocus-export --force"
                    )
                unet_c, decode_c = _contracts(entry, self.config)
                self._open[name] = (*self._backends(name, entry, unet_c, decode_c), unet_c, decode_c)
            return self._open[name]

    def _resolve_backend(self, name: str, entry: dict) -> str:
        """auto: TensorRT where this entry has engines and the machine can run them, else ONNX Runtime.
        tensorrt: an entry without TensorRT engines falls back to the PyTorch reference."""
        if self.backend not in ("auto", "tensorrt"):
            return self.backend
        from litefocus.export.tensorrt_build import tensorrt_available

        has_plans = all("plan" in entry["modules"][m]["files"] for m in ("unet", "decode"))
        if has_plans and tensorrt_available() and torch.cuda.is_available():
            if self.backend == "tensorrt":
                return "tensorrt"  # TensorRTBackend refuses engines of another TensorRT / GPU, saying why
            from litefocus.engine.tensorrt_backend import check_engine_target

            try:
                check_engine_target(entry["modules"]["unet"]["tensorrt"])
                return "tensorrt"
            except ValueError as e:
                logger.warning("%s: %s; using ONNX Runtime", name, e)
        if self.backend == "tensorrt":
            logger.warning("%s has no TensorRT engine for this machine: running it in PyTorch", name)
            return "torch"
        return "onnxruntime"

    def _backends(self, name, entry, unet_c, decode_c):
        from litefocus.engine.backends import OnnxRuntimeBackend, TorchBackend

        backend = self._resolve_backend(name, entry)
        modules = entry["modules"]
        if backend == "tensorrt":
            from litefocus.engine.tensorrt_backend import TensorRTBackend

            return tuple(
                TensorRTBackend(
                    mf.artifact_path(self.engine_dir, modules[m]["files"]["plan"]["path"]),
                    c,
                    modules[m]["tensorrt"],
                )
                for m, c in (("unet", unet_c), ("decode", decode_c))
            )
        if backend == "onnxruntime":
            from litefocus.export.validate import onnxruntime_providers

            providers = onnxruntime_providers(prefer_cuda=self.device.type == "cuda")  # follow the device
            return tuple(
                OnnxRuntimeBackend(
                    mf.artifact_path(self.engine_dir, modules[m]["files"]["onnx"]["path"]),
                    c,
                    providers,
                    data_path=mf.artifact_path(self.engine_dir, modules[m]["files"]["data"]["path"]),
                )
                for m, c in (("unet", unet_c), ("decode", decode_c))
            )
        from litefocus.export.decode import DecodeModule
        from litefocus.export.onnx_export import UNetExportModule

        unet, handle, vae, vocoder = self._torch_models(unet_c.inputs[0].torch_dtype)
        lock = self._torch_lock
        return (
            TorchBackend(UNetExportModule(unet, unet_c, handle), unet_c, self.device, lock),
            TorchBackend(DecodeModule.for_contract(vae, vocoder, decode_c), decode_c, self.device, lock),
        )

    def _torch_models(self, dtype: torch.dtype):
        """The PyTorch reference models of the manifest's source, with LiteFocus (once per dtype)."""
        if dtype not in self._models:
            import litefocus
            from litefocus.models import load_components

            unet, vae, vocoder = load_components(
                self.manifest["model"]["source"], dtype=dtype, device=self.device
            )
            handle = litefocus.install(unet, self.config) if self.config is not None else None
            self._models[dtype] = (unet, handle, vae, vocoder)
        return self._models[dtype]

    def scheduler_config(self) -> dict:
        return scheduler_config(self.manifest["model"]["source"])

    # ---- generation --------------------------------------------------------------------------
    def text_conditioner(self):
        """AudioLDM2's text encoders from the manifest's model source (loaded once)."""
        with self._lock:
            if self._text is None:
                from litefocus.runtime.conditioning import TextConditioner

                source = self.manifest["model"]["source"]
                if source.startswith("random:"):
                    raise ValueError(
                        f"{self.engine_dir} was exported with random weights ({source}) and has no text encoders; "
                        "use Runtime.generate_from_conditioning, or export from a real model (--model)"
                    )
                self._text = TextConditioner.load(source)
            return self._text

    def generate(
        self,
        prompt: str,
        seconds: float,
        *,
        negative_prompt: str | None = None,
        steps: int = 200,
        guidance_scale: float = 3.5,
        scheduler: str = "ddim",
        seed: int | None = None,
        progress: bool = True,
    ) -> Audio:
        """Text -> audio of exactly ``int(seconds * 16000)`` samples (AudioLDM2's defaults)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {negative_prompt!r}")
        _check_options(steps, guidance_scale, scheduler, seed)
        name = self.bucket_for(seconds)  # fail fast, before the text encoders run
        text_len = self.entries[name]["modules"]["unet"]["contract"]["text_len"]
        t0 = time.perf_counter()
        cond = self.text_conditioner()(
            prompt, negative_prompt, guided=guidance_scale > 1.0, max_text_len=text_len
        )
        t_cond = time.perf_counter() - t0
        audio = self.generate_from_conditioning(
            cond,
            seconds,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            progress=progress,
        )
        audio.timings["conditioning"] = t_cond
        return audio

    def generate_from_conditioning(
        self,
        cond: Conditioning,
        seconds: float,
        *,
        steps: int = 200,
        guidance_scale: float = 3.5,
        scheduler: str = "ddim",
        seed: int | None = None,
        progress: bool = True,
    ) -> Audio:
        """Sampling loop + decode from precomputed conditioning (CFG-batched: [uncond, cond])."""
        _check_options(steps, guidance_scale, scheduler, seed)
        name = self.bucket_for(seconds)
        t0 = time.perf_counter()
        unet, decode, unet_c, decode_c = self._engines(name)
        guided = guidance_scale > 1.0
        prompts = max(1, unet_c.batch // 2)  # CFG engines take [unconditional, conditional] per prompt
        if guided and unet_c.batch == 1:
            raise ValueError("this engine was exported with --batch 1 (no guidance): use guidance_scale=1")
        if cond.batch not in (prompts, 2 * prompts) or (guided and cond.batch != 2 * prompts):
            raise ValueError(
                f"conditioning has batch {cond.batch}; this engine takes {prompts} prompt(s): batch "
                f"{2 * prompts} with guidance ([unconditional, conditional]) or {prompts} without"
            )
        cond = _pad_text(cond, unet_c.text_len)
        if cond.batch < unet_c.batch:  # unguided on a CFG engine: run the pair, keep one half
            cond = Conditioning(*(torch.cat([x, x]) for x in (cond.gpt2, cond.t5, cond.t5_mask)))
        seed = secrets.randbits(63) if seed is None else seed
        generator = torch.Generator().manual_seed(seed)
        sched = make_scheduler(scheduler, self.scheduler_config())
        latents = initial_latents((prompts, *unet_c.bucket.latent_shape), generator, sched)
        specs = index_specs(unet_c)
        t1 = time.perf_counter()
        latents = denoise(
            unet,
            sched,
            latents,
            cond,
            steps=steps,
            guidance_scale=guidance_scale,
            index_specs=specs,
            generator=generator,
            dtype=unet_c.inputs[0].torch_dtype,
            progress=progress,
        )
        t2 = time.perf_counter()
        wave = decode({"latent": latents.to(decode_c.inputs[0].torch_dtype)})[0]
        t3 = time.perf_counter()
        samples = int(seconds * SAMPLE_RATE)
        return Audio(
            waveform=wave[:samples].numpy().astype("float32"),
            sample_rate=SAMPLE_RATE,
            seconds=seconds,
            bucket=name,
            timings={"setup": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2},
        )


def _warn_on_version_drift(manifest: dict) -> None:
    """ONNX graphs stay valid across these libraries' releases, so drift is a warning, not an error
    (TensorRT engines, which are tied to one version and GPU, are checked per engine)."""
    now = mf.library_versions()
    drift = [
        f"{k} {v} -> {now.get(k)}"
        for k, v in manifest.get("versions", {}).items()
        if k in ("litefocus", "onnx", "onnxruntime", "torch") and v != now.get(k)
    ]
    if drift:
        logger.warning(
            "engines were exported with other library versions (%s); re-export if results differ",
            ", ".join(drift),
        )


def _check_options(steps, guidance_scale, scheduler, seed) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or guidance_scale < 1
    ):
        raise ValueError(f"guidance_scale must be a number >= 1, got {guidance_scale!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")


def _pad_text(cond: Conditioning, length: int) -> Conditioning:
    """Pad (with mask 0) the T5 sequence to the engine's fixed length."""
    b, n, d = cond.t5.shape
    if n > length:
        raise ValueError(f"T5 conditioning has {n} tokens, the engine takes at most {length}")
    if n == length:
        return cond
    t5 = torch.cat([cond.t5, cond.t5.new_zeros(b, length - n, d)], dim=1)
    mask = torch.cat([cond.t5_mask, cond.t5_mask.new_zeros(b, length - n)], dim=1)
    return Conditioning(cond.gpt2, t5, mask)
