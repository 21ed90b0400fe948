"""Prompt -> ``Conditioning`` without torch: two tokenizer.json files + the "conditioning.onnx" graph.

Tokenization follows diffusers' ``AudioLDM2Pipeline.encode_prompt`` exactly:

* CLAP (RoBERTa): truncated and padded to the tokenizer's ``model_max_length`` (= ``clap_len``).
* Flan-T5, prompt: truncated to min(model_max_length, the engine's ``text_len``) = its own length L_p,
  no padding; negative ("" when None): truncated and padded to L_p.

Both rows are then padded to ``text_len`` (mask 0) and run as one pair [negative, prompt]; the
graph zeroes the T5 states at positions >= L_p, as ``Conditioning.padded`` does to diffusers' output.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from litefocus.engine import manifest as mf
from litefocus.engine.backends import load_session
from litefocus.engine.contract import ConditioningContract
from litefocus.runtime.sampling import Conditioning

logger = logging.getLogger(__name__)
FIX = mf.FIX


class TextEncoder:
    """``encoder(prompt, negative_prompt=None, guided=True) -> Conditioning``; thread-safe.

    Guided: batch 2, [negative, prompt]; unguided: batch 1, the prompt row (the graph still runs on
    the pair). Open with ``TextEncoder.load(engine_dir)`` (manifest checked, files hashed)."""

    def __init__(
        self,
        onnx_path: Path,
        data_path: Path,
        tokenizer_path: Path,
        tokenizer_2_path: Path,
        contract: ConditioningContract,
        tokenizers: dict,
        device: str = "cpu",
    ):
        from tokenizers import Tokenizer

        self.contract = contract
        clap, t5 = tokenizers["tokenizer"], tokenizers["tokenizer_2"]
        if clap["model_max_length"] != contract.clap_len:
            raise ValueError(
                f"the CLAP tokenizer's limit is not the contract's clap_len {contract.clap_len}; {FIX}"
            )
        self._clap_pad = int(clap["pad_id"])
        self._t5_pad = int(t5["pad_id"])
        # diffusers with tokenizer_2.model_max_length = min(limit, text_len), as the torch runtime set it
        self._t5_limit = min(int(t5["model_max_length"]), contract.text_len)
        try:
            self._clap = Tokenizer.from_file(str(tokenizer_path))
            self._t5 = Tokenizer.from_file(str(tokenizer_2_path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception on a bad file
            raise ValueError(
                f"{tokenizer_path.parent}: a tokenizer file is not readable ({str(e)[:120]}); {FIX}"
            ) from None
        for tok in (self._clap, self._t5):
            tok.no_padding()
            tok.no_truncation()
        self._session = load_session(onnx_path, contract, device, data_path)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, engine_dir: str | Path, manifest: dict | None = None, device: str = "cpu") -> TextEncoder:
        """The engine directory's text engine: manifest (read when not given) checked, files hashed."""
        engine_dir = Path(engine_dir)
        if manifest is None:
            manifest = mf.read_manifest(engine_dir)
        text = manifest.get("text")
        if text is None:
            raise ValueError(
                f"{engine_dir} has no text-conditioning engine (model source {manifest['model']['source']}; "
                "exports with --random-weights or --no-text, or from a model without text encoders, have none); "
                "use Runtime.generate_from_conditioning, or export from a real model (litefocus-export --model ...)"
            )
        problems = mf.verify_text(engine_dir, manifest)
        if problems:
            raise ValueError(
                f"the text engine in {engine_dir} failed verification: {'; '.join(problems)}; {FIX}"
            )
        try:
            contract = ConditioningContract.from_dict(text["contract"])
        except ValueError as e:
            raise ValueError(f"{engine_dir}: {e}; {FIX}") from None
        files = {k: mf.artifact_path(engine_dir, rec["path"]) for k, rec in text["files"].items()}
        return cls(
            files["onnx"],
            files["data"],
            files["tokenizer"],
            files["tokenizer_2"],
            contract,
            text["tokenizers"],
            device=device,
        )

    # ---- tokenization (diffusers' rules) -----------------------------------------------------
    @staticmethod
    def _encode(tok, text: str, max_length: int, warn: str | None = None) -> list[int]:
        """``text``'s ids truncated to ``max_length`` (special tokens included); ``warn``: the model
        named in diffusers' warning when something is cut off (diffusers warns for the prompt only)."""
        tok.enable_truncation(max_length=max_length)
        try:
            encoding = tok.encode(text)
        finally:
            tok.no_truncation()
        if warn and encoding.overflowing:
            removed = " ".join(tok.decode(o.ids) for o in encoding.overflowing)
            logger.warning(
                "The following part of your input was truncated because %s can only handle sequences up to "
                "%d tokens: %s",
                warn,
                max_length,
                removed[:200],
            )
        return list(encoding.ids)

    @staticmethod
    def _row(ids: list[int], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) > length:  # truncation keeps within the limit: only a tokenizer file that lies
            raise ValueError(f"the tokenizer returned {len(ids)} tokens past its limit of {length}; {FIX}")
        out = np.full(length, pad, np.int64)
        out[: len(ids)] = ids
        mask = np.zeros(length, np.int64)
        mask[: len(ids)] = 1
        return out, mask

    def tokenize(self, prompt: str, negative_prompt: str | None = None) -> dict[str, np.ndarray]:
        """The graph's four inputs for the pair [negative, prompt] (int64)."""
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
        if prompt is None:
            raise ValueError("prompt must be a string, got None")
        negative = "" if negative_prompt is None else negative_prompt
        c, n = self.contract.clap_len, self.contract.text_len
        with self._lock:
            clap = [
                self._row(self._encode(self._clap, t, c, warn), c, self._clap_pad)
                for t, warn in ((negative, None), (prompt, "clap"))
            ]
            t5_prompt = self._encode(self._t5, prompt, self._t5_limit, "t5")
            t5_negative = self._encode(self._t5, negative, len(t5_prompt))  # padded to L_p below
        # diffusers pads the negative to L_p; beyond L_p the graph's rows are padding too (mask 0)
        t5 = [self._row(t5_negative, n, self._t5_pad), self._row(t5_prompt, n, self._t5_pad)]
        return {
            "clap_input_ids": np.stack([r[0] for r in clap]),
            "clap_attention_mask": np.stack([r[1] for r in clap]),
            "t5_input_ids": np.stack([r[0] for r in t5]),
            "t5_attention_mask": np.stack([r[1] for r in t5]),
        }

    def __call__(self, prompt: str, negative_prompt: str | None = None, guided: bool = True) -> Conditioning:
        feeds = self.tokenize(prompt, negative_prompt)
        session = self._session  # one read: close() may run meanwhile
        if session is None:
            raise RuntimeError("TextEncoder is closed")
        gpt2, t5 = session.run(self.contract.output_names, feeds)
        mask = feeds["t5_attention_mask"].astype(np.int32)
        rows = slice(None) if guided else slice(1, 2)
        return Conditioning(gpt2=gpt2[rows], t5=t5[rows], t5_mask=mask[rows])

    def close(self) -> None:
        self._session = None
