"""Load AudioLDM2 components from a hub id or a local diffusers directory, or build seeded random ones.

``random_unet`` / ``random_vae`` / ``random_vocoder`` build the real architectures from the configs
shipped in ``litefocus/configs`` (no hub access needed): latency does not depend on weight values.
``load_unet`` / ``load_vae`` / ``load_vocoder`` read the ``unet/``, ``vae/`` and ``vocoder/``
subfolders of an AudioLDM2 pipeline directory (or that subfolder itself, or a hub id).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

UNET_CLASS_NAME = "AudioLDM2UNet2DConditionModel"
# preset -> config files in litefocus/configs per component (audioldm2-music shares the base
# architecture; "tiny" is the AudioLDM2 structure with tiny widths, for smoke tests and --quick runs)
_BASE = {"unet": "unet.json", "vae": "vae.json", "vocoder": "vocoder.json"}
PRESETS = {
    "audioldm2": _BASE,
    "audioldm2-music": _BASE,
    "audioldm2-large": {**_BASE, "unet": "unet-large.json"},
    "tiny": {"unet": "unet-tiny.json", "vae": "vae-tiny.json", "vocoder": "vocoder-tiny.json"},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class _Component:
    """One pipeline component: where it lives in a pipeline directory and which class loads it."""

    label: str  # for messages
    subfolder: str
    class_name: str
    library: str  # "diffusers" or "transformers"
    random_fn: str

    def model_class(self):
        import importlib

        return getattr(importlib.import_module(self.library), self.class_name)

    def from_pretrained(self, source, dtype: torch.dtype, **kwargs):
        dtype_key = "torch_dtype" if self.library == "diffusers" else "dtype"
        return self.model_class().from_pretrained(source, **{dtype_key: dtype}, **kwargs)


UNET = _Component("UNet", "unet", UNET_CLASS_NAME, "diffusers", "random_unet")
VAE = _Component("VAE", "vae", "AutoencoderKL", "diffusers", "random_vae")
VOCODER = _Component("vocoder", "vocoder", "SpeechT5HifiGan", "transformers", "random_vocoder")


def _shipped_config(filename: str) -> dict:
    return json.loads(resources.files("litefocus").joinpath("configs", filename).read_text())


def preset_config(preset: str, component: str = "unet") -> dict:
    """The config of one component (``unet``, ``vae``, ``vocoder``) of a preset, as shipped."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return _shipped_config(PRESETS[preset][component])


def _resolve_device(device: str | torch.device | None) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None


def check_device(raw: str) -> torch.device:
    """A usable device for the command-line ``--device`` flags (cpu, cuda, cuda:N), or a ValueError
    naming the bad value and the fix."""
    try:
        dev = torch.device(raw)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {raw!r} is not a device ({e}); use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {raw!r}: use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {raw}: this machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {raw}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _seeded(build: Callable[[], torch.nn.Module], seed: int, dtype: torch.dtype, device) -> torch.nn.Module:
    """``build()`` with the torch RNG seeded by ``seed`` (the global RNG is restored afterwards).

    On ``device="meta"`` no weights are allocated (for structure checks).
    """
    device = _resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.type == "meta":
            with torch.device("meta"):
                model = build()
        else:
            model = build()
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def random_unet(
    preset: str = "audioldm2",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """The real AudioLDM2 UNet architecture of ``preset`` with weights drawn from ``seed``.

    ``device="meta"`` builds it without allocating weights (for structure checks). The global torch
    RNG is left as it was.
    """
    config = preset_config(preset)
    return _seeded(lambda: UNET.model_class().from_config(config), seed, dtype, device)


def random_vae(
    seed: int = 0,
    *,
    preset: str = "audioldm2",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """The AudioLDM2 VAE of ``preset`` (diffusers AutoencoderKL, 55.4M parameters; ``scaling_factor``
    from its config) with weights drawn from ``seed``; like ``random_unet`` otherwise."""
    config = preset_config(preset, "vae")
    return _seeded(lambda: VAE.model_class().from_config(config), seed, dtype, device)


def random_vocoder(
    seed: int = 0,
    *,
    preset: str = "audioldm2",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """The AudioLDM2 vocoder of ``preset`` (transformers SpeechT5HifiGan, 55.3M parameters) with
    weights drawn from ``seed``; like ``random_unet`` otherwise."""
    from transformers import SpeechT5HifiGanConfig

    config = {k: v for k, v in preset_config(preset, "vocoder").items() if not k.startswith("_")}
    return _seeded(lambda: VOCODER.model_class()(SpeechT5HifiGanConfig(**config)), seed, dtype, device)


def component_dir(path: Path, component: _Component) -> Path:
    """The folder holding the component's config.json: ``path``'s subfolder or ``path`` itself."""
    for candidate in (path / component.subfolder, path):
        cfg = candidate / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
                # diffusers configs name the class in _class_name, transformers configs in architectures
                class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{cfg} is not a valid model config ({e})") from None
            if class_name != component.class_name:
                article = "an" if component.class_name[0] in "AEIOU" else "a"
                raise ValueError(
                    f"{cfg} describes a {class_name!r}, not {article} {component.class_name}; pass an AudioLDM2 "
                    f"pipeline directory or its {component.subfolder}/ folder"
                )
            return candidate
    raise ValueError(
        f"{path} is not an AudioLDM2 diffusers directory: no config.json in it or in "
        f"{path / component.subfolder}; pass a pipeline directory (saved with save_pretrained), its "
        f"{component.subfolder}/ folder, or a hub id such as cvssp/audioldm2"
    )


def _load(component: _Component, source: str | Path, dtype: torch.dtype, device) -> torch.nn.Module:
    """``component`` from a local pipeline directory (or its subfolder) or a hub id; one clear error."""
    device = _resolve_device(device)
    path = Path(str(source)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model source {str(source)!r} is a file; pass a diffusers directory or a hub id"
            )
        model = component.from_pretrained(component_dir(path, component), dtype)
        return model.to(device).eval()
    if not _HUB_ID.match(str(source)):
        raise ValueError(
            f"model source {str(source)!r} does not exist; pass an existing AudioLDM2 diffusers directory "
            "or a hub id such as cvssp/audioldm2"
        )
    logger.info("loading %s of %s from the Hugging Face hub", component.label, source)
    try:
        model = component.from_pretrained(str(source), dtype, subfolder=component.subfolder)
    except Exception as e:  # hub errors come as OSError, HTTP and offline errors of several kinds
        raise RuntimeError(
            f"could not load the {component.label} of {str(source)!r} from the Hugging Face hub: the hub is not "
            f"reachable (or offline mode is on), or it holds no AudioLDM2 pipeline of that name "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download the model and pass "
            f"its local directory, or use random weights (litefocus.models.{component.random_fn})"
        ) from None
    if type(model).__name__ != component.class_name:  # pragma: no cover - from_pretrained returns cls
        raise ValueError(f"{source} did not load as {component.class_name}")
    return model.to(device).eval()


def load_unet(
    source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
):
    """Load an AudioLDM2 UNet from a local diffusers directory or a hub id (``cvssp/audioldm2``)."""
    return _load(UNET, source, dtype, device)


def load_vae(
    source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
):
    """Load the AudioLDM2 VAE (``vae/`` of a pipeline directory, that folder itself, or a hub id)."""
    return _load(VAE, source, dtype, device)


def load_vocoder(
    source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
):
    """Load the AudioLDM2 vocoder (``vocoder/`` of a pipeline directory, that folder, or a hub id)."""
    return _load(VOCODER, source, dtype, device)


def random_source(preset: str, seed: int) -> str:
    """The model identity of seeded random weights, as recorded in engine manifests."""
    return f"random:{preset}:{seed}"


def parse_random_source(source: str) -> tuple[str, int]:
    """``random:<preset>:<seed>`` -> (preset, seed)."""
    try:
        _, preset, seed = source.split(":")
        seed = int(seed)
    except ValueError:
        raise ValueError(f"bad random model source {source!r}; expected random:<preset>:<seed>") from None
    preset_config(preset)  # names the known presets when it is not one
    return preset, seed


def unet_structure(source: str):
    """The UNet of ``source`` on the meta device: its structure without weights (for FLOP counts)."""
    if source.startswith("random:"):
        return random_unet(parse_random_source(source)[0], device="meta")
    cls = UNET.model_class()
    path = Path(source).expanduser()
    if path.is_dir():
        config = cls.load_config(component_dir(path, UNET))
    else:
        config = cls.load_config(source, subfolder=UNET.subfolder)
    with torch.device("meta"):
        return cls.from_config(config).eval()


def load_components(
    source: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
):
    """(unet, vae, vocoder) of a hub id, a local directory or ``random:<preset>:<seed>``."""
    if source.startswith("random:"):
        preset, seed = parse_random_source(source)
        return (
            random_unet(preset, seed, dtype=dtype, device=device),
            random_vae(seed, preset=preset, dtype=dtype, device=device),
            random_vocoder(seed, preset=preset, dtype=dtype, device=device),
        )
    return (
        load_unet(source, dtype=dtype, device=device),
        load_vae(source, dtype=dtype, device=device),
        load_vocoder(source, dtype=dtype, device=device),
    )


def scheduler_config(source: str) -> dict:
    """The scheduler config of a model source: its own (a local directory or a hub id), else the
    AudioLDM2 DDIM defaults shipped with litefocus (random weights, or a hub model without one).
    The export records it in the manifest; the runtime's numpy samplers read it from there."""
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
