"""Prompt -> ``Conditioning`` without torch: two tokenizer.json files + the "conditioning.onnx" graph.

Tokenization follows diffusers' ``AudioLDM2Pipeline.encode_prompt`` exactly:

* CLAP (RoBERTa): truncated and padded to the tokenizer's ``model_max_length`` (= ``clap_len``).
* Flan-T5, prompt: truncated to min(model_max_length, the engine's ``text_len``) = its own length L_p,
  no padding; negative ("" when None): truncated and padded to L_p.

Both rows are then padded to ``text_len`` (mask 0) and run as one pair [negative, prompt]; the
graph zeroes the T5 states at positions >= L_p, as ``Conditioning.padded`` does to diffusers' output.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from litefocus.engine.backends import GraphOptions, load_session, run_session
from litefocus.engine.entries import Manifest, TextRecord, load_manifest
from litefocus.engine.manifest import FIX, MAX_FILE_BYTES
from litefocus.engine.pinned import Pinned, pin_files
from litefocus.runtime.inputs import check_prompt
from litefocus.runtime.options import Conditioning

logger = logging.getLogger(__name__)


class TextEncoder:
    """``encoder(prompt, negative_prompt=None, guided=True) -> Conditioning``; thread-safe.

    Guided: batch 2, [negative, prompt]; unguided: batch 1, the prompt row (the graph still runs on
    the pair). Open with ``TextEncoder.load(engine_dir)`` (manifest checked, files hashed).

    Built from the manifest's text ``record`` and its files as ``pinned`` (verified, the graph and
    tokenizer files' bytes kept as hashed: those bytes are what is parsed). A tokenizer file is
    untrusted: its size is capped, its pieces (model, normalizer, pre-tokenizer, post-processor,
    decoder, regex patterns) must be among those the exporter writes, and a tokenizer panic is one
    RuntimeError line."""

    def __init__(self, record: TextRecord, pinned: Pinned, device: str = "cpu"):
        contract = self.contract = record.contract
        clap, t5 = record.tokenizers["tokenizer"], record.tokenizers["tokenizer_2"]
        if clap["model_max_length"] != contract.clap_len:
            raise ValueError(
                f"the CLAP tokenizer's limit is not the contract's clap_len {contract.clap_len}; {FIX}"
            )
        self._clap_pad = int(clap["pad_id"])
        self._t5_pad = int(t5["pad_id"])
        # diffusers with tokenizer_2.model_max_length = min(limit, text_len), as the torch runtime set it
        self._t5_limit = min(int(t5["model_max_length"]), contract.text_len)
        self._clap = _tokenizer(pinned.path("tokenizer"), pinned.data("tokenizer"))
        self._t5 = _tokenizer(pinned.path("tokenizer_2"), pinned.data("tokenizer_2"))
        for tok in (self._clap, self._t5):
            tok.no_padding()
            tok.no_truncation()
        graph = pinned.data("onnx")
        options = GraphOptions(device=device, data_path=pinned.path("data"), graph=graph)
        self._session = load_session(pinned.path("onnx"), contract, options)
        self._limits = _id_limits(graph)
        for name, tok in (("clap_input_ids", self._clap), ("t5_input_ids", self._t5)):
            size = _guard(lambda t=tok: t.get_vocab_size(with_added_tokens=True), "the tokenizer", ValueError)
            self._limits[name] = min(self._limits.get(name, size), size)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, engine_dir: str | Path, manifest: Manifest | None = None, device: str = "cpu"
    ) -> TextEncoder:
        """The engine directory's text engine: manifest (read when not given) checked, files hashed."""
        engine_dir = Path(engine_dir)
        if manifest is None:
            manifest = load_manifest(engine_dir)
        text = manifest.text
        if text is None:
            raise ValueError(
                f"{engine_dir} has no text-conditioning engine (model source {manifest.model['source']}; "
                "exports with --random-weights or --no-text, or from a model without text encoders, have none); "
                "use Runtime.generate_from_conditioning, or export from a real model (litefocus-export --model ...)"
            )
        with pin_files(engine_dir, text.raw["files"], "the text engine") as pinned:
            encoder = cls(text, pinned, device=device)
            try:
                pinned.recheck()
            except BaseException:
                encoder.close()
                raise
        return encoder

    # ---- tokenization (diffusers' rules) -----------------------------------------------------
    @staticmethod
    def _encode(tok, text: str, max_length: int, warn: str | None = None) -> list[int]:
        """``text``'s ids truncated to ``max_length`` (special tokens included); ``warn``: the model
        named in diffusers' warning when something is cut off (diffusers warns for the prompt only)."""

        def encode():
            tok.enable_truncation(max_length=max_length)
            try:
                return tok.encode(text)
            finally:
                tok.no_truncation()

        encoding = _guard(encode, "tokenizing the prompt", RuntimeError)
        if warn and encoding.overflowing:
            removed = _guard(
                lambda: " ".join(tok.decode(o.ids) for o in encoding.overflowing), "decoding", RuntimeError
            )
            logger.warning(
                "The following part of your input was truncated because %s can only handle sequences up to "
                "%d tokens: %s",
                warn,
                max_length,
                _printable(removed[:200]),
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
        check_prompt(prompt, "prompt")
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative_prompt")
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
        feeds = {
            "clap_input_ids": np.stack([r[0] for r in clap]),
            "clap_attention_mask": np.stack([r[1] for r in clap]),
            "t5_input_ids": np.stack([r[0] for r in t5]),
            "t5_attention_mask": np.stack([r[1] for r in t5]),
        }
        for name, limit in self._limits.items():
            ids = feeds[name]
            if ids.min() < 0 or ids.max() >= limit:
                bad = int(ids.max() if ids.max() >= limit else ids.min())
                raise ValueError(
                    f"{name}: the tokenizer gave token id {bad}, outside the model's {limit} embeddings "
                    f"(tokenizer file or pad id does not match the graph); {FIX}"
                )
        return feeds

    def __call__(self, prompt: str, negative_prompt: str | None = None, guided: bool = True) -> Conditioning:
        feeds = self.tokenize(prompt, negative_prompt)
        session = self._session  # one read: close() may run meanwhile
        if session is None:
            raise RuntimeError("TextEncoder is closed")
        gpt2, t5 = run_session("conditioning", session.run, self.contract.output_names, feeds)
        got, want = (gpt2.shape, t5.shape), tuple(tuple(o.shape) for o in self.contract.outputs)
        if got != want:  # the graph's fault, not the request's: never a ValueError about conditioning
            raise RuntimeError(
                f"the conditioning graph returned shapes {got}, its contract says {want}; {FIX}"
            )
        mask = feeds["t5_attention_mask"].astype(np.int32)
        rows = slice(None) if guided else slice(1, 2)
        return Conditioning(gpt2=gpt2[rows], t5=t5[rows], t5_mask=mask[rows])

    def close(self) -> None:
        self._session = None


# ---- an untrusted tokenizer.json -------------------------------------------------------------------
MAX_TOKENIZER_BYTES = MAX_FILE_BYTES["tokenizer"]
# What the exporter writes (transformers' fast RoBERTa / GPT-2 byte-level BPE and T5 Unigram tokenizers):
# any other piece, or a regex pattern but these, is refused (a backtracking pattern stalls the text thread).
ALLOWED_TYPES = {
    "model": {"BPE", "Unigram"},
    "normalizer": {"Sequence", "Precompiled", "Replace", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip",
                   "StripAccents", "Prepend"},
    "pre_tokenizer": {"Sequence", "ByteLevel", "Metaspace", "WhitespaceSplit", "Whitespace", "Split"},
    "post_processor": {"Sequence", "RobertaProcessing", "TemplateProcessing", "ByteLevel"},
    "decoder": {"Sequence", "ByteLevel", "Metaspace", "Replace", "Strip", "Fuse", "ByteFallback"},
}  # fmt: skip
ALLOWED_REGEX = {
    " {2,}",  # T5's normalizer: runs of spaces -> one
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",  # GPT-2's split
}


def _guard(fn, what: str, error: type):
    """``fn()``, with any failure of the tokenizers library (pyo3's PanicException derives from
    BaseException) turned into one ``error`` line."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a Rust panic arrives as pyo3_runtime.PanicException
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise error(f"{what} failed in the tokenizer ({type(e).__name__}: {first or 'no message'})") from None


def _printable(text: str) -> str:
    """``text`` for a log line: control characters (a newline forging a log line, a terminal escape)
    as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# A piece may not lengthen the text much: a chain of expanding Replace normalizers ("a" -> "aaaaaaaaaa",
# seven times) turns a 2000-character prompt into 2e10 characters, and the text thread never returns.
MAX_INSERT_CHARS = 16  # Prepend's text, a regex Replace's content ("▁" and " " in real files)
MAX_CHARSMAP_PIECE = 128  # bytes a Precompiled normalizer may map one character to (NFKC's longest is 33)


def _charsmap_piece(blob: object) -> int:
    """The longest replacement (bytes) in a Precompiled normalizer's charsmap (a u32 trie size, the
    trie, then NUL-separated replacements); ValueError when it is not one."""
    import base64
    import binascii

    try:
        data = base64.b64decode(blob, validate=True) if isinstance(blob, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    trie = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
    if trie < 0 or 4 + trie > len(data):
        raise ValueError("a Precompiled normalizer's charsmap is not base64 of a sentencepiece charsmap")
    return max(map(len, data[4 + trie :].split(b"\0")), default=0)


def _expansion(node: dict) -> str | None:
    """Why the piece ``node`` could blow a prompt up, or None."""
    kind, pattern = node.get("type"), node.get("pattern")
    if kind == "Replace":
        content = node.get("content")
        literal = pattern.get("String") if isinstance(pattern, dict) and "String" in pattern else None
        regex = isinstance(pattern, dict) and "Regex" in pattern  # the allowed ones match 2+ characters
        most = len(literal) if isinstance(literal, str) else 1 if regex else 0
        if not isinstance(content, str) or len(content) > min(most, MAX_INSERT_CHARS):
            return "a Replace whose content is longer than what it replaces"
    if kind == "Prepend" and not (
        isinstance(node.get("prepend"), str) and len(node["prepend"]) <= MAX_INSERT_CHARS
    ):
        return f"a Prepend of more than {MAX_INSERT_CHARS} characters"
    if kind == "Precompiled" and _charsmap_piece(node.get("precompiled_charsmap")) > MAX_CHARSMAP_PIECE:
        return f"a Precompiled charsmap that maps a character to more than {MAX_CHARSMAP_PIECE} bytes"
    return None


def _components(node, section: str):
    """(section, type) of every typed piece under ``node``, every regex pattern ("regex", pattern)
    and every piece that lengthens text too much ("expansion", why)."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield section, node["type"]
            if (why := _expansion(node)) is not None:
                yield "expansion", why
        if "Regex" in node:
            yield "regex", node["Regex"]
        for value in node.values():
            yield from _components(value, section)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value, section)


def check_tokenizer_json(spec, name: str) -> None:
    """Refuse (ValueError, one line) a tokenizer.json with a piece or regex pattern the exporter never
    writes; ``spec``: the parsed file."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ValueError(f"{name} is not a tokenizer.json (no model); {FIX}")
    model = {k: v for k, v in spec["model"].items() if k not in ("vocab", "merges")}
    found = [("model", spec["model"].get("type"))]
    found += _components(model, "model")
    for section in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        found += _components(spec.get(section), section)
    precompiled = sum(1 for section, value in found if section == "normalizer" and value == "Precompiled")
    if precompiled > 1:  # each one may lengthen the text: they would compound
        found.append(("expansion", f"{precompiled} Precompiled normalizers"))
    for section, value in found:
        if section == "expansion":
            raise ValueError(f"{name}: {value} is not what litefocus-export writes; {FIX}")
        allowed = ALLOWED_REGEX if section == "regex" else ALLOWED_TYPES[section]
        if not isinstance(value, str) or value not in allowed:
            what = "regex pattern" if section == "regex" else f"{section} type"
            raise ValueError(
                f"{name}: {what} {json.dumps(value)[:80]} is not one litefocus-export writes "
                f"(allowed: {', '.join(sorted(allowed))[:200]}); {FIX}"
            )
    if spec["model"].get("dropout") not in (None, 0, 0.0):
        raise ValueError(f"{name}: BPE dropout makes tokenization random; {FIX}")


def _tokenizer(path: Path, data: bytes):
    """A ``tokenizers.Tokenizer`` of the bytes of ``path`` (size-capped, checked against the allowlist)."""
    from tokenizers import Tokenizer

    if len(data) > MAX_TOKENIZER_BYTES:
        raise ValueError(
            f"{path.name} is larger than the {MAX_TOKENIZER_BYTES} bytes a tokenizer may have; {FIX}"
        )
    try:
        text = data.decode("utf-8")
        spec = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path.name} is not UTF-8 JSON ({type(e).__name__}); {FIX}") from None
    check_tokenizer_json(spec, path.name)
    return _guard(lambda: Tokenizer.from_str(text), f"reading {path.name}", ValueError)


def _id_limits(graph: bytes) -> dict[str, int]:
    """{input: rows of the embedding table it indexes} for the graph's token-id inputs (a Gather of an
    initializer by the input itself, as the exporter writes); ids at or past it are refused."""
    import onnx

    model = onnx.load_model_from_string(graph)
    rows = {i.name: int(i.dims[0]) for i in model.graph.initializer if len(i.dims) == 2}
    limits: dict[str, int] = {}
    for node in model.graph.node:
        ids = node.input[1] if node.op_type == "Gather" and len(node.input) == 2 else None
        if ids in ("clap_input_ids", "t5_input_ids") and node.input[0] in rows:
            limits[ids] = min(limits.get(ids, rows[node.input[0]]), rows[node.input[0]])
    return limits
