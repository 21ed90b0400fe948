"""The text-conditioning engine's export: once per engine directory, in ``text/``.

Prompt -> UNet conditioning (CLAP, T5, the projection and GPT-2's generated states) as one static
graph with its two tokenizers, so that serving needs no torch. It is reused when its cache key
matches and its files verify, else built in a scratch folder and renamed to ``text/``; the caller
hands the returned record to the engine directory's writer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from litefocus.engine.contract import GPT2_TOKENS
from litefocus.engine.manifest import TEXT_DIR, library_versions, verify_text
from litefocus.engine.writer import EngineDirLock, file_record
from litefocus.export.onnx_export import OPSET
from litefocus.export.plan import ExportPlan
from litefocus.export.source import ModelSource, text_cache_key
from litefocus.export.stages import Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextJob:
    """The text engine to export (or keep) in the engine directory that ``lock`` holds."""

    plan: ExportPlan
    source: ModelSource
    lock: EngineDirLock
    manifest: dict  # the directory's manifest as it stands (its text record, if any, may be reused)


def language_model_positions(source: str) -> int | None:
    """The language model's (GPT-2's) learned positions, from its config; None when unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, subfolder="language_model")
    except (OSError, ValueError):
        return None  # loading the text parts reports it
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) else None


def check_text_positions(positions: int | None, text_len: int) -> None:
    """GPT-2 reads [sos, clap, eos, sos1, T5 x text_len, eos1] and its own states as it generates
    them: text_len + 12 positions for the last of the 8. Diffusers runs a model with fewer for short
    prompts; the static graph would index past them: refuse in one line, naming the fix."""
    extra = 5 + GPT2_TOKENS - 1
    if positions is None or text_len + extra <= positions:
        return
    fix = f"pass --text-len {positions - extra} or less, or " if positions > extra else "pass "
    raise ValueError(
        f"--text-len {text_len}: the language model has {positions} positions, fewer than the "
        f"{text_len + extra} that {text_len} T5 tokens + 4 markers + {GPT2_TOKENS} generated states take; "
        f"{fix}--no-text to skip the text engine"
    )


def export_text(job: TextJob, progress: Progress) -> dict | None:
    """The text engine's new record, or None when the directory's own is reused (key and files match)."""
    from litefocus.export.conditioning import conditioning_contract, export_conditioning, load_text_parts

    plan, lock = job.plan, job.lock
    key = text_cache_key(plan, job.source.text_identity())
    old = job.manifest.get("text")
    if not plan.force and old and old.get("key") == key and not verify_text(lock.out, job.manifest):
        logger.info("text engine: cached (key %s)", key[:12])
        return None
    progress("text engine: export", 0)
    t0 = time.perf_counter()
    source = job.source.identity["source"]
    try:
        parts = load_text_parts(source)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(
            f"could not load the text encoders of {source} ({type(e).__name__}: {first}); pass --no-text to "
            "export without the text engine"
        ) from None
    check_text_positions(
        getattr(parts["language_model"].config, "max_position_embeddings", None), plan.text_len
    )
    contract = conditioning_contract(parts, plan.text_len)
    with lock.building(TEXT_DIR, listed="text" in job.manifest) as tmp:  # only the folder the manifest lists
        result = export_conditioning(parts, contract, tmp, device=plan.device)
        return {
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "opset": OPSET,
            "contract": contract.to_dict(),
            "files": {k: file_record(p, TEXT_DIR) for k, p in result["paths"].items()},
            "tokenizers": result["tokenizers"],
            "validation": result["validation"],
            "export_seconds": time.perf_counter() - t0,
            "versions": library_versions(),
        }
