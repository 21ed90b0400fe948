"""The text-conditioning module the text engine is traced from (export/conditioning.py), in PyTorch:
``ConditioningExportModule`` against diffusers' own ``AudioLDM2Pipeline.encode_prompt`` on the tiny
pipeline, with random prompts and weights, and the contract / tokenizer records it is exported with.
(The exported graph, run without torch, is checked in test_conditioning_engine.py.)"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from litefocus.engine.contract import GPT2_TOKENS
from litefocus.export.conditioning import (
    VERY_LARGE,
    ConditioningExportModule,
    conditioning_contract,
    tokenizer_record,
)
from tiny_models import CLAP_MAX_LENGTH, GPT2_DIM, T5_DIM, T5_MAX_LENGTH, make_tiny_pipeline

WORDS = (
    "a",
    "dog",
    "barks",
    "rain",
    "falls",
    "on",
    "the",
    "roof",
    "techno",
    "music",
    "birds",
    "sing",
    "quietly",
)


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline(seed=random.randrange(2**31))


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def graph_inputs(pipe, prompt: str, negative: str, text_len: int) -> tuple[torch.Tensor, ...]:
    """The engine's inputs for [negative, prompt], as the runtime builds them: CLAP padded to its
    limit; the prompt's T5 ids at its own length L_p, the negative's truncated / padded to L_p; both
    then padded to ``text_len`` (mask 0)."""
    clap = pipe.tokenizer(
        [negative, prompt],
        padding="max_length",
        max_length=CLAP_MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    t5 = pipe.tokenizer_2
    limit = min(t5.model_max_length, text_len)
    prompt_t5 = t5(prompt, truncation=True, max_length=limit)
    prompt_len = len(prompt_t5["input_ids"])
    negative_t5 = t5(negative, padding="max_length", truncation=True, max_length=prompt_len)
    ids = torch.full((2, text_len), t5.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(2, text_len, dtype=torch.int64)
    for row, encoded in enumerate((negative_t5, prompt_t5)):
        ids[row, :prompt_len] = torch.tensor(encoded["input_ids"])
        mask[row, :prompt_len] = torch.tensor(encoded["attention_mask"])
    return clap["input_ids"], clap["attention_mask"], ids, mask


def module_of(pipe, text_len: int) -> ConditioningExportModule:
    parts = {
        "tokenizer": pipe.tokenizer,
        "language_model": pipe.language_model,
        "text_encoder_2": pipe.text_encoder_2,
    }
    contract = conditioning_contract(parts, text_len)
    return ConditioningExportModule(
        pipe.text_encoder, pipe.text_encoder_2, pipe.projection_model, pipe.language_model, contract
    ).eval()


@pytest.mark.parametrize("text_len", [T5_MAX_LENGTH, 10])
def test_module_matches_diffusers_encode_prompt(pipe, text_len, monkeypatch):
    """Padding to ``text_len`` changes nothing: the GPT-2 states equal diffusers' generated ones and
    the T5 states equal diffusers' up to L_p, zero after. (A ``text_len`` below the tokenizer's
    limit truncates there, as the runtime sets it for diffusers too; above the limit the language
    model would run out of positions, which the export refuses.)"""
    monkeypatch.setattr(
        pipe.tokenizer_2, "model_max_length", min(pipe.tokenizer_2.model_max_length, text_len)
    )
    rng = random.Random()
    seed = rng.randrange(2**31)
    rng.seed(seed)
    prompt, negative = text(rng, rng.randint(2, 12)), text(rng, rng.randint(1, 14))
    inputs = graph_inputs(pipe, prompt, negative, text_len)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2, t5 = module_of(pipe, text_len)(*inputs)
        want_t5, _, want_gpt2 = pipe.encode_prompt(
            prompt, "cpu", 1, True, negative_prompt=negative, max_new_tokens=GPT2_TOKENS
        )
    where = f"seed {seed}: {prompt!r} / {negative!r}"
    assert gpt2.shape == (2, GPT2_TOKENS, GPT2_DIM) and t5.shape == (2, text_len, T5_DIM), where
    prompt_len = want_t5.shape[1]
    torch.testing.assert_close(gpt2, want_gpt2, rtol=1e-5, atol=1e-5, msg=where)
    torch.testing.assert_close(t5[:, :prompt_len], want_t5, rtol=1e-5, atol=1e-5, msg=where)
    assert torch.count_nonzero(t5[:, prompt_len:]) == 0, where
    # another prompt (changed at its start: a long one is truncated at its end) gives other states
    other = graph_inputs(pipe, "birds sing " + prompt, negative, text_len)
    with torch.inference_mode():
        assert (module_of(pipe, text_len)(*other)[0] - want_gpt2).abs().max() > 1e-4, where


def test_contract_has_the_parts_dimensions(pipe):
    text_len = random.randint(1, 40)
    parts = {
        "tokenizer": pipe.tokenizer,
        "language_model": pipe.language_model,
        "text_encoder_2": pipe.text_encoder_2,
    }
    contract = conditioning_contract(parts, text_len)
    assert (contract.clap_len, contract.text_len, contract.gpt2_dim, contract.t5_dim) == (
        CLAP_MAX_LENGTH,
        text_len,
        GPT2_DIM,
        T5_DIM,
    )


def test_contract_refuses_a_tokenizer_without_a_limit(pipe, monkeypatch):
    monkeypatch.setattr(pipe.tokenizer, "model_max_length", int(1e30))
    parts = {
        "tokenizer": pipe.tokenizer,
        "language_model": pipe.language_model,
        "text_encoder_2": pipe.text_encoder_2,
    }
    with pytest.raises(ValueError, match="no model_max_length"):
        conditioning_contract(parts, 8)


def test_tokenizer_record_is_what_the_runner_needs(pipe):
    clap = tokenizer_record(pipe.tokenizer, "max_length")
    t5 = tokenizer_record(pipe.tokenizer_2, "longest")
    assert clap == {
        "model_max_length": CLAP_MAX_LENGTH,
        "pad_id": pipe.tokenizer.pad_token_id,
        "padding": "max_length",
    }
    assert t5 == {
        "model_max_length": T5_MAX_LENGTH,
        "pad_id": pipe.tokenizer_2.pad_token_id,
        "padding": "longest",
    }


def test_tokenizer_record_caps_no_limit_and_refuses_what_the_runner_cannot_do(pipe, monkeypatch):
    monkeypatch.setattr(pipe.tokenizer_2, "model_max_length", int(1e30))
    assert tokenizer_record(pipe.tokenizer_2, "longest")["model_max_length"] == VERY_LARGE
    monkeypatch.setattr(pipe.tokenizer_2, "padding_side", "left")
    with pytest.raises(ValueError, match="padding_side is not 'right'"):
        tokenizer_record(pipe.tokenizer_2, "longest")


def test_a_vits_text_encoder_is_refused(pipe):
    class VitsLike:
        config = type("Config", (), {"use_learned_position_embedding": True})()

    with pytest.raises(ValueError, match="Flan-T5"):
        ConditioningExportModule(
            pipe.text_encoder, pipe.text_encoder_2, VitsLike(), pipe.language_model, None
        )
