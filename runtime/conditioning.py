"""Text conditioning: AudioLDM2's CLAP + Flan-T5 -> projection -> GPT-2 path, in PyTorch.

Prompt handling (tokenization, truncation warnings, the negative prompt, CFG batching) is diffusers'
own ``AudioLDM2Pipeline.encode_prompt``, called on these components; only the 8-step GPT-2
generation is ours: transformers 5 removed the generation helper diffusers calls on a plain
``GPT2Model`` (what the cvssp checkpoints ship; diffusers issue #12630), so we run the loop
without a cache (feed ``inputs_embeds``, append the last hidden state, extend the mask).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import torch

from litefocus.engine.contract import GPT2_TOKENS
from litefocus.runtime.sampling import Conditioning


def generate_language_model(language_model, inputs_embeds, attention_mask, max_new_tokens=GPT2_TOKENS):
    """GPT-2 continues the projected prompt by ``max_new_tokens`` hidden states: [B, 8, D]."""
    if max_new_tokens is None:
        max_new_tokens = GPT2_TOKENS
    mask = attention_mask
    for _ in range(max_new_tokens):
        # default positions (0..n-1), as diffusers' loop passes none
        out = language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True, return_dict=True
        )
        inputs_embeds = torch.cat([inputs_embeds, out.hidden_states[-1][:, -1:, :]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return inputs_embeds[:, -max_new_tokens:, :]


class TextConditioner:
    """Prompt -> ``Conditioning`` ([negative, prompt] when guided). Thread-safe (one call at a time)."""

    PARTS = (
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "projection_model",
        "language_model",
    )

    def __init__(self, **parts):
        missing = [p for p in self.PARTS if parts.get(p) is None]
        if missing:
            raise ValueError(f"text conditioning needs {', '.join(missing)}")
        for p in self.PARTS:
            if isinstance(parts[p], torch.nn.Module):
                parts[p].eval()
        lm = parts["language_model"]
        self._ns = SimpleNamespace(
            **parts,
            generate_language_model=lambda embeds, attention_mask=None, max_new_tokens=None: (
                generate_language_model(lm, embeds, attention_mask, max_new_tokens)
            ),
        )
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str | Path) -> TextConditioner:
        """The text components of an AudioLDM2 pipeline directory (or hub id)."""
        from diffusers import AudioLDM2ProjectionModel
        from transformers import AutoModel, AutoTokenizer, ClapModel, T5EncoderModel

        kw = {}
        try:
            return cls(
                tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
                tokenizer_2=AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw),
                text_encoder=ClapModel.from_pretrained(source, subfolder="text_encoder"),
                text_encoder_2=T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2"),
                projection_model=AudioLDM2ProjectionModel.from_pretrained(
                    source, subfolder="projection_model"
                ),
                language_model=AutoModel.from_pretrained(source, subfolder="language_model"),
            )
        except (OSError, ValueError) as e:
            raise ValueError(
                f"could not load AudioLDM2's text encoders from {source} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); engines exported with --random-weights have none: "
                "use Runtime.generate_from_conditioning with precomputed conditioning"
            ) from None

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        guided: bool = True,
        max_text_len: int | None = None,
    ) -> Conditioning:
        """``max_text_len``: the engine's T5 length; longer prompts are truncated (with diffusers' warning)."""
        from diffusers import AudioLDM2Pipeline

        tok = self._ns.tokenizer_2
        with self._lock, torch.inference_mode():
            limit = tok.model_max_length
            if max_text_len is not None:
                tok.model_max_length = min(limit, max_text_len)
            try:
                t5, mask, gpt2 = AudioLDM2Pipeline.encode_prompt(
                    self._ns,
                    prompt,
                    torch.device("cpu"),
                    1,
                    guided,
                    negative_prompt=negative_prompt,
                    max_new_tokens=GPT2_TOKENS,
                )
            finally:
                tok.model_max_length = limit
        return Conditioning(gpt2=gpt2.float(), t5=t5.float(), t5_mask=mask)
