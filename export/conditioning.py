"""AudioLDM2's text conditioning as one static ONNX graph ("conditioning.onnx") + its tokenizers.

``ConditioningExportModule`` reproduces diffusers' ``AudioLDM2Pipeline.encode_prompt`` for one CFG
pair [negative, prompt] at static lengths: CLAP's pooled text features, the Flan-T5 encoder,
the projection ([sos, clap, eos, sos1, t5 x text_len, eos1]) and 8 cache-free GPT-2 steps.

diffusers encodes the prompt at its own T5 length L_p (no padding) and pads the negative to L_p;
the graph sees both padded to ``text_len`` >= L_p. Padded T5 positions are masked keys, so they
change nothing, but GPT-2's learned positions would: the tail (eos1, then the generated states)
gets the positions it has in diffusers' L_p-long layout through explicit ``position_ids``. T5
states at positions >= L_p are zeroed (the runtime zero-pads diffusers' output there too).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from litefocus.engine.contract import GPT2_TOKENS, ConditioningContract
from litefocus.export.onnx_export import export_onnx
from litefocus.export.validate import validate

logger = logging.getLogger(__name__)

TEXT_PARTS = (
    "tokenizer",
    "tokenizer_2",
    "text_encoder",
    "text_encoder_2",
    "projection_model",
    "language_model",
)
VERY_LARGE = 1_000_000  # transformers' "no limit" model_max_length is ~1e30


class ConditioningExportModule(torch.nn.Module):
    """(clap ids, clap mask, t5 ids, t5 mask) [2, *] -> (gpt2 [2, 8, Dg], t5 [2, text_len, Dt])."""

    def __init__(self, text_encoder, text_encoder_2, projection_model, language_model, contract):
        super().__init__()
        if getattr(projection_model.config, "use_learned_position_embedding", None) is not None:
            raise ValueError("the conditioning export supports Flan-T5 (AudioLDM2), not a VITS text encoder")
        self.clap = text_encoder
        self.t5 = text_encoder_2
        self.projection = projection_model
        self.gpt2 = getattr(language_model, "base_model", language_model)  # GPT2LMHeadModel -> GPT2Model
        self.contract = contract

    def forward(self, clap_input_ids, clap_attention_mask, t5_input_ids, t5_attention_mask):
        clap = self.clap.get_text_features(clap_input_ids, attention_mask=clap_attention_mask)
        clap = getattr(clap, "pooler_output", clap)[:, None, :]  # transformers 5: an output object
        clap_mask = torch.ones_like(clap_attention_mask[:, :1])
        text_len = t5_input_ids.shape[1]
        t5 = self.t5(t5_input_ids, attention_mask=t5_attention_mask)[0]
        # L_p: the prompt's own T5 length (the negative is padded / truncated to it)
        prompt_len = t5_attention_mask.sum(dim=1).max()
        keep = (torch.arange(text_len, device=t5.device) < prompt_len).to(t5.dtype)
        t5 = t5 * keep[None, :, None]
        projected = self.projection(
            hidden_states=clap,
            hidden_states_1=t5,
            attention_mask=clap_mask,
            attention_mask_1=t5_attention_mask,
        )
        embeds, mask = projected.hidden_states, projected.attention_mask
        # positions: diffusers' arange over [sos, clap, eos, sos1, t5 x L_p, eos1, generated...];
        # the static layout has text_len - L_p masked pads before eos1: shift the tail back over them
        total = embeds.shape[1] + GPT2_TOKENS - 1
        index = torch.arange(total, device=embeds.device)
        tail = (index >= text_len + 4).to(index.dtype)
        positions = (index - tail * (text_len - prompt_len))[None, :]
        for _ in range(GPT2_TOKENS):
            n = embeds.shape[1]
            hidden = self.gpt2(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions[:, :n], use_cache=False
            ).last_hidden_state
            embeds = torch.cat([embeds, hidden[:, -1:, :]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return embeds[:, -GPT2_TOKENS:, :], t5


def load_text_parts(source: str | Path) -> dict:
    """The text components of an AudioLDM2 pipeline directory or hub id, fp32 on CPU, eager attention."""
    from diffusers import AudioLDM2ProjectionModel
    from transformers import AutoModel, AutoTokenizer, ClapModel, T5EncoderModel

    eager = {"attn_implementation": "eager"}
    return {
        "tokenizer": AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
        "tokenizer_2": AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
        "text_encoder": ClapModel.from_pretrained(source, subfolder="text_encoder", **eager).float().eval(),
        "text_encoder_2": T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", **eager)
        .float()
        .eval(),
        "projection_model": AudioLDM2ProjectionModel.from_pretrained(source, subfolder="projection_model")
        .float()
        .eval(),
        "language_model": AutoModel.from_pretrained(source, subfolder="language_model", **eager)
        .float()
        .eval(),
    }


def conditioning_contract(parts: dict, text_len: int) -> ConditioningContract:
    """The contract of these parts: CLAP padded to its tokenizer's limit, T5 to ``text_len``."""
    clap_len = int(parts["tokenizer"].model_max_length)
    if clap_len > VERY_LARGE:
        raise ValueError("the CLAP tokenizer has no model_max_length: its padded length is unknown")
    lm = parts["language_model"]
    return ConditioningContract(
        clap_len=clap_len,
        text_len=text_len,
        gpt2_dim=int(lm.config.hidden_size),
        t5_dim=int(parts["text_encoder_2"].config.d_model),
    )


def tokenizer_record(tokenizer, padding: str) -> dict:
    """What the torch-free runner needs besides tokenizer.json: the limit, the pad id, the padding rule."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no tokenizers backend (tokenizer.json)")
    for side in ("padding_side", "truncation_side"):
        if getattr(tokenizer, side, "right") != "right":
            raise ValueError(
                f"{type(tokenizer).__name__}.{side} is not 'right'; the runner pads on the right"
            )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token")
    limit = int(tokenizer.model_max_length)
    return {
        "model_max_length": min(limit, VERY_LARGE),
        "pad_id": int(tokenizer.pad_token_id),
        "padding": padding,
    }


class _VocabInputs:
    """The contract, with sample inputs drawn inside both vocabularies (for ``validate``)."""

    def __init__(self, contract: ConditioningContract, vocab_sizes: tuple[int, int]):
        self._contract, self._vocab = contract, vocab_sizes

    def __getattr__(self, name):
        return getattr(self._contract, name)

    def sample_inputs(self, seed: int = 0) -> dict:
        return self._contract.sample_inputs(seed, vocab_sizes=self._vocab)


def export_conditioning(
    parts: dict, contract: ConditioningContract, out_dir: Path, *, seed: int = 0, device="cpu"
) -> dict:
    """Export, validate (traced and run in PyTorch on the CPU; ONNX Runtime on ``device``, the
    export's ``--device``) and save the tokenizers into ``out_dir``; returns
    {"paths": {onnx, data, tokenizer, tokenizer_2}, "tokenizers", "validation", "export_seconds"}."""
    missing = [p for p in TEXT_PARTS if parts.get(p) is None]
    if missing:
        raise ValueError(f"the text engine needs {', '.join(missing)}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    tokenizers = {
        "tokenizer": tokenizer_record(parts["tokenizer"], "max_length"),
        "tokenizer_2": tokenizer_record(parts["tokenizer_2"], "longest"),
    }
    if tokenizers["tokenizer"]["model_max_length"] != contract.clap_len:
        raise ValueError("the contract's clap_len is not the CLAP tokenizer's model_max_length")
    modules = [parts[p] for p in ("text_encoder", "text_encoder_2", "projection_model", "language_model")]
    for m in modules:
        m.eval()
        if hasattr(m, "set_attn_implementation"):  # plain MatMul / Softmax: traces on every version
            m.set_attn_implementation("eager")
    module = ConditioningExportModule(*modules, contract).eval()
    vocab = (len(parts["tokenizer"]), len(parts["tokenizer_2"]))
    sampled = _VocabInputs(contract, (min(vocab[0], 1000), min(vocab[1], 1000)))
    graph, data = export_onnx(module, sampled, out_dir / "conditioning.onnx", seed=seed)
    export_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    validation = validate(graph, module, sampled, seed=seed + 1, ort_device=device)
    validation["seconds"] = time.perf_counter() - t1
    paths = {"onnx": graph, "data": data}
    for name in ("tokenizer", "tokenizer_2"):
        path = out_dir / f"{name}.json"
        backend = parts[name].backend_tokenizer
        text = json.loads(backend.to_str())
        text["truncation"] = text["padding"] = None  # the runner sets both per call
        path.write_text(json.dumps(text, ensure_ascii=False))
        paths[name] = path
    logger.info("exported the text engine (CLAP %d + T5 %d tokens)", contract.clap_len, contract.text_len)
    return {"paths": paths, "tokenizers": tokenizers, "validation": validation, "export_seconds": export_s}
