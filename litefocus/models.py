"""Load an AudioLDM2 UNet from a hub id or a local diffusers directory, or build a seeded random one.

``random_unet`` builds the real architecture from the configs shipped in ``litefocus/configs``
(no hub access needed): latency does not depend on weight values.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

UNET_CLASS_NAME = "AudioLDM2UNet2DConditionModel"
# preset -> config file in litefocus/configs (audioldm2-music shares the base architecture)
PRESETS = {
    "audioldm2": "unet.json",
    "audioldm2-music": "unet.json",
    "audioldm2-large": "unet-large.json",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def preset_config(preset: str) -> dict:
    """The diffusers UNet config of a preset, as shipped in the package."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("litefocus").joinpath("configs", PRESETS[preset]).read_text()
    return json.loads(text)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None


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
    from diffusers import AudioLDM2UNet2DConditionModel

    config = preset_config(preset)
    device = _resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.type == "meta":
            with torch.device("meta"):
                unet = AudioLDM2UNet2DConditionModel.from_config(config)
        else:
            unet = AudioLDM2UNet2DConditionModel.from_config(config)
    unet = unet.to(device)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def _unet_dir(path: Path) -> Path:
    """The folder holding the UNet's config.json: ``path`` itself or its ``unet/`` subfolder."""
    for candidate in (path / "unet", path):
        cfg = candidate / "config.json"
        if cfg.is_file():
            try:
                class_name = json.loads(cfg.read_text()).get("_class_name")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{cfg} is not a valid diffusers config ({e})") from None
            if class_name != UNET_CLASS_NAME:
                raise ValueError(
                    f"{cfg} describes a {class_name!r}, not an {UNET_CLASS_NAME}; pass an AudioLDM2 "
                    "pipeline directory or its unet/ folder"
                )
            return candidate
    raise ValueError(
        f"{path} is not an AudioLDM2 diffusers directory: no config.json in it or in {path / 'unet'}; "
        "pass a pipeline directory (saved with save_pretrained), its unet/ folder, or a hub id such as "
        "cvssp/audioldm2"
    )


def load_unet(
    source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
):
    """Load an AudioLDM2 UNet from a local diffusers directory or a hub id (``cvssp/audioldm2``)."""
    from diffusers import AudioLDM2UNet2DConditionModel

    device = _resolve_device(device)
    path = Path(str(source)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model source {str(source)!r} is a file; pass a diffusers directory or a hub id"
            )
        folder = _unet_dir(path)
        unet = AudioLDM2UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
        return unet.to(device).eval()
    if not _HUB_ID.match(str(source)):
        raise ValueError(
            f"model source {str(source)!r} does not exist; pass an existing AudioLDM2 diffusers directory "
            "or a hub id such as cvssp/audioldm2"
        )
    logger.info("loading UNet of %s from the Hugging Face hub", source)
    try:
        unet = AudioLDM2UNet2DConditionModel.from_pretrained(str(source), subfolder="unet", torch_dtype=dtype)
    except Exception as e:  # hub errors come as OSError, HTTP and offline errors of several kinds
        raise RuntimeError(
            f"could not load the UNet of {str(source)!r} from the Hugging Face hub: the hub is not reachable "
            f"(or offline mode is on), or it holds no AudioLDM2 pipeline of that name ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); download the model and pass its local directory, "
            "or use random weights (litefocus.models.random_unet)"
        ) from None
    if type(unet).__name__ != UNET_CLASS_NAME:  # pragma: no cover - from_pretrained returns cls
        raise ValueError(f"{source} did not load as an {UNET_CLASS_NAME}")
    return unet.to(device).eval()
