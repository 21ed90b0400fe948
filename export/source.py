"""The model an export is built from: its identity, its cache keys, and its components, loaded once.

An engine directory holds the engines of one model: the manifest records the model's identity (its
source and a hash of its weights), and an entry is reused only when its cache key (a hash of
everything that shapes its artifacts: model, code, library versions, the plan's choices) matches.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

import litefocus
from litefocus.buckets import Bucket
from litefocus.engine.contract import DecodeContract
from litefocus.engine.manifest import SCHEMA_VERSION, file_sha256, json_sha256, library_versions
from litefocus.export.onnx_export import OPSET
from litefocus.export.plan import ExportOptions, ExportPlan
from litefocus.models import random_source

logger = logging.getLogger(__name__)


class ModelSource:
    """The requested model: its identity now, its components loaded on first use and shared by every
    bucket."""

    def __init__(self, opts: ExportOptions):
        self.opts = opts
        self._models = None
        self.identity = self._identity()

    def _identity(self) -> dict:
        o = self.opts
        if o.random_preset is not None:
            return {"source": random_source(o.random_preset, o.weights_seed), "weights_sha256": None}
        path = Path(str(o.model)).expanduser()
        if path.is_dir():
            # only what the engines are built from: the UNet, VAE and vocoder (not the text encoders)
            roots = [path / c for c in ("unet", "vae", "vocoder") if (path / c).is_dir()] or [path]
            files = sorted(
                p
                for root in roots
                for p in root.rglob("*")
                if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")
            )
            digest = json_sha256([[p.relative_to(path).as_posix(), file_sha256(p)] for p in files])
            return {"source": str(path.resolve()), "weights_sha256": digest}
        return {"source": o.model, "weights_sha256": None}  # hub: filled in by weights_identity()

    def weights_identity(self) -> dict:
        """The identity with a weight hash; a hub model is loaded (and hashed) for it."""
        if self.identity["weights_sha256"] is None and self.opts.random_preset is None:
            unet, _, vae, vocoder = self.models()
            self.identity["weights_sha256"] = json_sha256(
                [state_dict_sha256(m) for m in (unet, vae, vocoder)]
            )
        return self.identity

    def models(self) -> tuple:
        """(unet with LiteFocus installed, handle or None, vae, vocoder) in the export precision."""
        if self._models is None:
            from litefocus.models import load_components

            dtype = torch.float16 if self.opts.precision == "fp16" else torch.float32
            unet, vae, vocoder = load_components(
                self.identity["source"], dtype=dtype, device=self.opts.device
            )
            handle = litefocus.install(unet, self.opts.litefocus) if self.opts.litefocus is not None else None
            self._models = (unet, handle, vae, vocoder)
        return self._models

    def text_parts(self) -> list[str] | None:
        """The model's text-component folders, None when it has none (random weights, a directory
        without them); a hub id is assumed to have them (loading says otherwise)."""
        if self.opts.random_preset is not None:
            return None
        from litefocus.export.conditioning import TEXT_PARTS

        path = Path(str(self.opts.model)).expanduser()
        if not path.is_dir():
            return list(TEXT_PARTS)
        present = [p for p in TEXT_PARTS if (path / p).is_dir()]
        if present and len(present) < len(TEXT_PARTS):
            logger.warning(
                "%s has %s but not %s: no text engine exported",
                path,
                ", ".join(present),
                ", ".join(p for p in TEXT_PARTS if p not in present),
            )
        return present if len(present) == len(TEXT_PARTS) else None

    def text_identity(self) -> dict:
        """What the text engine is built from: the text folders' files (a local model), else the hub id
        with the engines' weight hash (a proxy for the revision)."""
        from litefocus.export.conditioning import TEXT_PARTS

        source = self.identity["source"]
        path = Path(source)
        if path.is_dir():
            files = sorted(p for part in TEXT_PARTS for p in (path / part).rglob("*") if p.is_file())
            digest = json_sha256([[p.relative_to(path).as_posix(), file_sha256(p)] for p in files])
            return {"source": source, "text_sha256": digest}
        return {"source": source, "weights_sha256": self.weights_identity()["weights_sha256"]}

    def parameter_count(self) -> int:
        """Parameters of the UNet, VAE and vocoder (what the export's memory estimate scales with)."""
        unet, _, vae, vocoder = self.models()
        return sum(p.numel() for m in (unet, vae, vocoder) for p in m.parameters())

    def chunking_error(self, contract: DecodeContract) -> dict:
        """The time-chunked decode's error against the full decode, measured on this model."""
        from litefocus.export.decode import chunking_error

        _, _, vae, vocoder = self.models()
        result = chunking_error(vae, vocoder, contract)
        logger.info(
            "%s: time-chunked decode (window %d frames, overlap %d) vs full: max %.2e, RMS %.2e of the RMS",
            contract.bucket.name,
            contract.window_frames,
            contract.overlap_frames,
            result["max_rel_rms_vs_full"],
            result["rms_rel_vs_full"],
        )
        return result

    def decode(self, contract: DecodeContract):
        """The decode module (VAE decoder + vocoder) of ``contract``, in eval mode."""
        from litefocus.export.decode import DecodeModule

        _, _, vae, vocoder = self.models()
        return DecodeModule.for_contract(vae, vocoder, contract).eval()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.cache
def code_sha256() -> str:
    """SHA-256 of litefocus's own Python sources: a changed exporter invalidates cached artifacts."""
    import litefocus.engine
    import litefocus.export

    roots = [Path(m.__file__).parent for m in (litefocus, litefocus.export, litefocus.engine)]
    files = sorted({p for r in roots for p in r.glob("*.py")})
    return json_sha256([[p.parent.name + "/" + p.name, file_sha256(p)] for p in files])


def cache_key(plan: ExportPlan, identity: dict, bucket: Bucket, batch: int) -> str:
    """Hash of everything that shapes an entry's artifacts (the contracts follow from these).

    TensorRT engines are tied to one TensorRT version and GPU: those join the key when built."""
    target = None
    if plan.backend == "tensorrt":
        from litefocus.export.tensorrt_build import current_target

        target = current_target()
    return json_sha256(
        {
            "schema": SCHEMA_VERSION,
            "versions": library_versions(),
            "code": code_sha256(),
            "model": identity,
            "opset": OPSET,
            "litefocus": None if plan.litefocus is None else plan.litefocus.to_dict(),
            "backend": plan.backend,
            "tensorrt_target": target,
            "frames": bucket.frames,
            "batch": batch,
            "text_len": plan.text_len,
            "precision": plan.precision,
            "attention": plan.attention,
            "conv": plan.conv,
            "gpu_ops": list(plan.gpu_ops),
            "decode_window": plan.decode_window,
        }
    )


def text_cache_key(plan: ExportPlan, text_identity: dict) -> str:
    """Hash of everything that shapes the text engine's artifacts."""
    return json_sha256(
        {
            "schema": SCHEMA_VERSION,
            "versions": library_versions(),
            "code": code_sha256(),
            "model": text_identity,
            "opset": OPSET,
            "text_len": plan.text_len,
            "module": "conditioning",
        }
    )
