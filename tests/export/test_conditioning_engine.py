"""The text-conditioning engine (text/conditioning.onnx + tokenizers, run without torch) against
diffusers' own ``AudioLDM2Pipeline.encode_prompt`` on the tiny pipeline."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from litefocus.engine import manifest as mf
from litefocus.engine.contract import GPT2_TOKENS, ConditioningContract
from litefocus.export.build import export_engines
from litefocus.export.plan import ExportOptions
from litefocus.export.source import ModelSource
from litefocus.runtime.text import TextEncoder
from tiny_models import GPT2_DIM, T5_DIM, T5_MAX_LENGTH, save_tiny_pipeline

TEXT_LEN = 10  # below the tiny T5 tokenizer's 16: the min(limit, text_len) rule truncates at 10
TOL = 1e-4

CASES = {
    "short, no negative": ("a dog barks", None),
    "longer negative (truncated to the prompt's length)": (
        "rain falls",
        "low quality noise bad audio with a car engine and people talk",
    ),
    "prompt longer than text_len (truncated)": (
        "techno music with a strong upbeat tempo and high melodic riffs in the distance",
        "low quality",
    ),
    "words outside the corpus": ("a xylophone zzz plays quietly", "muffled hiss"),
}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-pipeline")
    save_tiny_pipeline(path)
    return path


@pytest.fixture(scope="module")
def engines(pipe_dir, tmp_path_factory):
    """An engine directory with the text engine only (no buckets: their export is what takes time)."""
    out = tmp_path_factory.mktemp("text") / "engines"
    opts = ExportOptions(seconds=(), out=out, model=str(pipe_dir), text_len=TEXT_LEN, quiet=True)
    export_engines(opts)
    return out


@pytest.fixture(scope="module")
def encoder(engines):
    enc = TextEncoder.load(engines)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    from diffusers import AudioLDM2Pipeline

    p = AudioLDM2Pipeline.from_pretrained(pipe_dir)
    p.tokenizer_2.model_max_length = min(p.tokenizer_2.model_max_length, TEXT_LEN)  # as the runtime did
    return p


def diffusers_conditioning(pipe, prompt, negative_prompt, guided=True):
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t5, mask, gpt2 = pipe.encode_prompt(
            prompt, "cpu", 1, guided, negative_prompt=negative_prompt, max_new_tokens=GPT2_TOKENS
        )
    return gpt2.numpy(), t5.numpy(), mask.numpy()


def assert_matches(got, want):
    gpt2, t5, mask = want
    n = t5.shape[1]
    assert got.gpt2.shape == gpt2.shape
    assert got.t5.shape == (t5.shape[0], TEXT_LEN, T5_DIM) and got.t5_mask.shape == (t5.shape[0], TEXT_LEN)
    gpt2_err = float(np.abs(got.gpt2 - gpt2).max())
    t5_err = float(np.abs(got.t5[:, :n] - t5).max())
    assert gpt2_err <= TOL, f"gpt2 max abs {gpt2_err:.3g}"
    assert t5_err <= TOL, f"t5 max abs {t5_err:.3g}"
    assert not got.t5[:, n:].any()
    padded = np.zeros((mask.shape[0], TEXT_LEN), np.int32)
    padded[:, :n] = mask
    np.testing.assert_array_equal(got.t5_mask, padded)
    assert got.t5_mask.dtype == np.int32 and got.gpt2.dtype == got.t5.dtype == np.float32
    return gpt2_err, t5_err


@pytest.mark.parametrize("case", CASES)
def test_text_engine_matches_diffusers_encode_prompt(encoder, pipe, case):
    prompt, negative = CASES[case]
    got = encoder(prompt, negative)
    assert got.batch == 2 and got.gpt2.shape == (2, GPT2_TOKENS, GPT2_DIM)
    assert_matches(got, diffusers_conditioning(pipe, prompt, negative))


def test_tokenization_follows_diffusers_truncation(encoder, caplog):
    with caplog.at_level("WARNING"):
        feeds = encoder.tokenize(*CASES["longer negative (truncated to the prompt's length)"])
    assert "truncated" not in caplog.text  # diffusers warns for the prompt only
    mask = feeds["t5_attention_mask"]
    assert mask[1].sum() == mask[0].sum() < TEXT_LEN  # the negative is cut to L_p
    with caplog.at_level("WARNING"):
        long = encoder.tokenize(CASES["prompt longer than text_len (truncated)"][0])
    assert (
        "truncated because t5 can only handle sequences up to 10 tokens: melodic riffs in the distance"
        in caplog.text
    )
    assert long["t5_attention_mask"][1].sum() == min(T5_MAX_LENGTH, TEXT_LEN)
    assert long["t5_input_ids"][1, TEXT_LEN - 1] == 1  # T5's </s> kept at the end after truncation
    assert long["clap_attention_mask"].shape == (2, encoder.contract.clap_len)


def test_unguided_is_the_prompt_row(encoder, pipe):
    prompt = "a cat meows while birds sing"
    got = encoder(prompt, guided=False)
    assert got.batch == 1
    assert_matches(got, diffusers_conditioning(pipe, prompt, None, guided=False))


def test_concurrent_calls_agree(encoder):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [CASES[k] for k in CASES] * 2
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda pn: encoder(*pn), prompts))
    for (prompt, negative), got in zip(prompts, results, strict=True):
        want = encoder(prompt, negative)
        np.testing.assert_array_equal(got.gpt2, want.gpt2)
        np.testing.assert_array_equal(got.t5_mask, want.t5_mask)


def test_manifest_records_the_text_engine(engines, encoder):
    manifest = mf.read_manifest(engines)
    text = manifest["text"]
    assert {k: v["path"] for k, v in text["files"].items()} == {
        "onnx": "text/conditioning.onnx",
        "data": "text/conditioning.onnx.data",
        "tokenizer": "text/tokenizer.json",
        "tokenizer_2": "text/tokenizer_2.json",
    }
    assert text["tokenizers"]["tokenizer_2"] == {
        "model_max_length": T5_MAX_LENGTH,
        "pad_id": 0,
        "padding": "longest",
    }
    contract = ConditioningContract.from_dict(text["contract"])
    assert contract == encoder.contract and contract.text_len == TEXT_LEN
    assert all(v["max_rel_rms"] <= contract.tolerance for v in text["validation"]["outputs"].values())
    assert mf.verify_text(engines, manifest) == []


def test_second_export_reuses_the_text_engine(engines, pipe_dir):
    graph = engines / "text" / "conditioning.onnx"
    before = graph.stat().st_mtime_ns
    opts = ExportOptions(seconds=(), out=engines, model=str(pipe_dir), text_len=TEXT_LEN, quiet=True)
    export_engines(opts)
    assert graph.stat().st_mtime_ns == before


def test_tampered_or_unlisted_text_folder(engines, pipe_dir, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(engines, copy)
    tok = copy / "text" / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<pad>", "<pda>"))
    with pytest.raises(ValueError, match="failed verification.*tokenizer.json"):
        TextEncoder.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["text"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    opts = ExportOptions(seconds=(), out=copy, model=str(pipe_dir), text_len=TEXT_LEN, quiet=True, force=True)
    with pytest.raises(ValueError, match="does not list"):
        export_engines(opts)
    assert tok.exists()  # never deleted: the manifest does not list it


def test_random_weights_and_bad_records_have_no_text_engine(engines):
    opts = ExportOptions(seconds=(), out=engines, model=None, random_preset="tiny", quiet=True)
    assert ModelSource(opts).text_parts() is None
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["text"]["files"]["onnx"]["path"] = "text/other.onnx"
    with pytest.raises(mf.ManifestError, match="must be text/conditioning.onnx"):
        mf.check_text(engines / "manifest.json", manifest["text"])
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["text"]["tokenizers"]["tokenizer"]["model_max_length"] += 1
    with pytest.raises(mf.ManifestError, match="clap_len"):
        mf.check_text(engines / "manifest.json", manifest["text"])
    manifest = json.loads((engines / "manifest.json").read_text())
    unet_inputs = [
        {"name": "encoder_hidden_states", "shape": [2, GPT2_TOKENS, GPT2_DIM + 1], "dtype": "float32"}
    ]
    entries = {"5s-fp32": {"modules": {"unet": {"contract": {"inputs": unet_inputs}}}}}
    with pytest.raises(mf.ManifestError, match="widths"):
        mf.check_text(engines / "manifest.json", manifest["text"], entries)
