"""The tiny AudioLDM2Pipeline from tiny_models runs end to end through diffusers' own __call__."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tiny_models import (
    CLAP_MAX_LENGTH,
    GPT2_DIM,
    GPT2_MAX_NEW_TOKENS,
    T5_DIM,
    T5_MAX_LENGTH,
    make_tiny_pipeline,
    make_tiny_pipeline_components,
    make_tiny_tokenizers,
    save_tiny_pipeline,
)

# diffusers 0.42's generate_language_model passes past_key_values=None on every step; transformers 5.24
# deprecates that argument name (it keeps the cache under `cache`, which diffusers never feeds back).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

PROMPT = "a dog barks"
# 20 corpus words: longer than both tokenizers' 16 tokens (14 words fit the CLAP side, 15 the T5 side).
LONG_PROMPT = (
    "a dog barks loudly in the distance while birds sing in the trees and rain falls on a roof with thunder"
)


def _run(pipe, prompt=PROMPT, seed=0, **kwargs):
    out = pipe(
        prompt,
        num_inference_steps=3,
        audio_length_in_s=0.64,
        generator=torch.Generator().manual_seed(seed),
        num_waveforms_per_prompt=1,
        **kwargs,
    )
    return out.audios


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def audio(pipe):
    return _run(pipe)


def test_tokenizers():
    tokenizer, tokenizer_2 = make_tiny_tokenizers()
    assert (tokenizer.model_max_length, tokenizer_2.model_max_length) == (CLAP_MAX_LENGTH, T5_MAX_LENGTH)
    # every corpus word is one token: <s> a dog barks </s> and a dog barks </s>
    assert len(tokenizer(PROMPT).input_ids) == 5
    assert tokenizer_2(PROMPT).input_ids[-1] == tokenizer_2.eos_token_id
    assert len(tokenizer_2(PROMPT).input_ids) == 4
    unknown = tokenizer_2("a zebra barks").input_ids
    assert unknown[1] == tokenizer_2.unk_token_id and len(unknown) == 4
    assert tokenizer.unk_token_id not in tokenizer("a zebra barks").input_ids  # byte-level fallback
    clap = tokenizer(LONG_PROMPT, padding="max_length", max_length=CLAP_MAX_LENGTH, truncation=True)
    assert len(clap.input_ids) == CLAP_MAX_LENGTH and clap.input_ids[-1] == tokenizer.eos_token_id
    short = tokenizer(PROMPT, padding="max_length", max_length=CLAP_MAX_LENGTH, return_tensors="pt")
    assert short.input_ids.shape == (1, CLAP_MAX_LENGTH) and short.attention_mask.sum() == 5


def test_components_seeded():
    state = torch.random.get_rng_state()
    first, again, other = (make_tiny_pipeline_components(seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("text_encoder", "text_encoder_2", "projection_model", "language_model", "unet"):
        a, b, c = (parts[name].state_dict() for parts in (first, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name


def test_runs_end_to_end(pipe, audio):
    assert audio.shape == (1, 10240)
    assert np.isfinite(audio).all()
    assert audio.std() > 1e-4


def test_encode_prompt_shapes(pipe):
    with torch.no_grad():
        embeds, mask, generated = pipe.encode_prompt(LONG_PROMPT, torch.device("cpu"), 1, True)
    # classifier-free guidance: [negative, positive]; T5 side padded to the longest (the truncated prompt)
    assert embeds.shape == (2, T5_MAX_LENGTH, T5_DIM)
    assert mask.shape == (2, T5_MAX_LENGTH)
    assert generated.shape == (2, GPT2_MAX_NEW_TOKENS, GPT2_DIM)


def test_seeded(pipe, audio):
    np.testing.assert_array_equal(_run(pipe, seed=0), audio)
    assert np.abs(_run(pipe, seed=1) - audio).max() > 1e-4


def test_negative_prompt(pipe, audio):
    negative = _run(pipe, negative_prompt="low quality noise")
    assert negative.shape == audio.shape and np.isfinite(negative).all()
    assert np.abs(negative - audio).max() > 1e-4


def test_long_prompt_is_truncated(pipe):
    records = _Records()
    logger = logging.getLogger("diffusers.pipelines.audioldm2.pipeline_audioldm2")
    logger.addHandler(records)
    try:
        long_audio = _run(pipe, LONG_PROMPT)
    finally:
        logger.removeHandler(records)
    assert any("was truncated" in m for m in records.messages), records.messages
    assert np.isfinite(long_audio).all()
    # words past both tokenizers' limits change nothing
    np.testing.assert_array_equal(_run(pipe, LONG_PROMPT + " and wind"), long_audio)


def test_save_and_load(tmp_path, audio):
    from diffusers import AudioLDM2Pipeline

    save_tiny_pipeline(tmp_path, seed=0)
    loaded = AudioLDM2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.language_model).__name__ == "GPT2LMHeadModel"
    assert loaded.language_model.config.max_new_tokens == GPT2_MAX_NEW_TOKENS
    assert loaded.tokenizer.model_max_length == CLAP_MAX_LENGTH
    np.testing.assert_array_equal(_run(loaded), audio)
