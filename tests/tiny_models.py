"""Tiny random AudioLDM2 components built in code (no hub access), shared by the tests."""

from __future__ import annotations

import torch

from litefocus.models import preset_config


def _private_keys_dropped(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# The package's "tiny" preset (litefocus/configs/*-tiny.json): same structure as cvssp/audioldm2
# (4 levels, no attention at the first, [None, x, y] transformers per layer, latent F = 16 so the
# attention levels have 8, 4 and 2 frequency bins), with tiny widths.
TINY_UNET_CONFIG = _private_keys_dropped(preset_config("tiny", "unet"))
GPT2_DIM, T5_DIM = 12, 20


def make_tiny_unet(seed: int = 0):
    from diffusers import AudioLDM2UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = AudioLDM2UNet2DConditionModel(**TINY_UNET_CONFIG)
    return unet.eval()


def tiny_unet_inputs(batch: int = 2, frames: int = 24, seed: int = 1, text_len: int = 5) -> dict:
    """Random inputs for one tiny UNet call; latent [B, 8, frames, 16]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, -2:] = 0  # one padded prompt
    return {
        "sample": torch.randn(batch, 8, frames, 16, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 8, GPT2_DIM, generator=g),
        "encoder_hidden_states_1": torch.randn(batch, text_len, T5_DIM, generator=g),
        "encoder_attention_mask_1": mask,
    }


# AudioLDM2's VAE structure (1-channel mel in/out, 8 latent channels, 3 levels: 64 mel bins -> 16
# latent bins, 4 mel frames per latent frame) with tiny widths. The scaling factor (0.37) differs
# from the real 0.411 so that a hard-coded value would show up.
TINY_VAE_CONFIG = _private_keys_dropped(preset_config("tiny", "vae"))
# AudioLDM2's vocoder structure (64 mel bins, 16 kHz, the real upsample rates and kernels: 160
# samples per mel frame, plus the real 32-sample overhang) with tiny channels (32 -> 1). Weights are
# drawn wider than transformers' default (0.01) so the waveform is audible (RMS ~0.04) rather than ~1e-10.
TINY_VOCODER_CONFIG = _private_keys_dropped(preset_config("tiny", "vocoder"))


def make_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return vae.eval()


def make_tiny_vocoder(seed: int = 0):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**TINY_VOCODER_CONFIG))
    return vocoder.eval()


# ---------------------------------------------------------------------------------------------
# A complete tiny AudioLDM2Pipeline: tokenizers built offline, tiny CLAP / T5 / projection / GPT-2
# around the tiny UNet, VAE and vocoder above. Widths: GPT-2 hidden size = GPT2_DIM (12) and T5
# d_model = T5_DIM (20), so they match TINY_UNET_CONFIG's cross-attention widths [None, 12, 20].

# Every word the tests use; the tokenizers are built from it. RoBERTa-style (byte-level BPE): every
# corpus word is one token, anything else falls back to byte pieces (as real RoBERTa does; it has no
# <unk> in practice). T5-style (Unigram of whole words): a word outside the corpus is one <unk>.
TOKENIZER_CORPUS = (
    "a dog barks loudly in the distance",
    "a cat meows while birds sing in the trees",
    "rain falls on a roof with thunder and wind",
    "a man speaks and people talk in a busy street",
    "techno music with a strong upbeat tempo and high melodic riffs",
    "piano and drums play a slow song",
    "water flows in a small stream near a car engine",
    "low quality noise bad audio",
)
CLAP_MAX_LENGTH = 16  # RoBERTa-style tokenizer: the pipeline pads to it ("max_length")
T5_MAX_LENGTH = 16  # T5-style tokenizer: the pipeline pads to the longest prompt, truncates here
CLAP_PROJECTION_DIM = 8  # ClapModel.projection_dim = AudioLDM2ProjectionModel.text_encoder_dim
GPT2_MAX_NEW_TOKENS = 8  # as in cvssp/audioldm2: the UNet sees [B, 8, GPT2_DIM]

TINY_CLAP_TEXT_CONFIG = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    # RoBERTa positions start at pad_token_id + 1; headroom above CLAP_MAX_LENGTH because the
    # pipeline's waveform scoring tokenizes without truncation.
    "max_position_embeddings": 66,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
# HTSAT audio tower: 8 mel bins, spec_size 16 (freq_ratio 2: up to 32 frames x 8 bins), 2x2 patches,
# window 4, two stages (8 -> 16 channels = hidden_size).
TINY_CLAP_AUDIO_CONFIG = {
    "spec_size": 16,
    "num_mel_bins": 8,
    "window_size": 4,
    "patch_size": 2,
    "patch_stride": 2,
    "patch_embeds_hidden_size": 8,
    "depths": [1, 1],
    "num_attention_heads": [2, 2],
    "hidden_size": 16,
    "intermediate_size": 32,
    "enable_fusion": False,
    "patch_embed_input_channels": 1,
}
# 1 s at 48 kHz with hop 1600 -> 31 frames x 8 mel bins (fits the audio tower above).
TINY_FEATURE_EXTRACTOR_CONFIG = {
    "feature_size": 8,
    "sampling_rate": 48_000,
    "hop_length": 1600,
    "max_length_s": 1,
    "fft_window_size": 1024,
    "truncation": "rand_trunc",
    "padding": "repeatpad",
}
TINY_T5_CONFIG = {  # Flan-T5 style (gated-gelu, untied), d_model = T5_DIM
    "d_model": T5_DIM,
    "d_kv": 10,
    "num_heads": 2,
    "d_ff": 32,
    "num_layers": 1,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# GPT-2 only ever sees inputs_embeds: a small vocabulary is enough. Sequence length:
# CLAP (1 + sos/eos) + T5 (<= 16 + sos/eos) + 8 generated = at most 29 positions.
TINY_GPT2_CONFIG = {
    "n_embd": GPT2_DIM,
    "n_head": 2,
    "n_layer": 2,
    "n_positions": 64,
    "vocab_size": 16,
    "bos_token_id": 15,
    "eos_token_id": 15,
}


def _build_roberta_style(max_length: int):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizer

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2, unk 3
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,  # more than the corpus can fill: every corpus word ends up one token
        min_frequency=1,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is dropped
        show_progress=False,
    )
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # add_prefix_space: the first word gets the same token as elsewhere (corpus words are learned
    # with a leading space only).
    return RobertaTokenizer(
        vocab=model["vocab"], merges=merges, add_prefix_space=True, model_max_length=max_length
    )


def _build_t5_style(max_length: int):
    from transformers import T5Tokenizer

    words = sorted({word for line in TOKENIZER_CORPUS for word in line.split()})
    # T5's ids: pad 0, eos 1, unk 2 (T5Tokenizer hard-codes unk_id=2). Whole-word Unigram pieces only
    # (no bare "▁" or single characters), so an unknown word becomes a single fused <unk>.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def make_tiny_tokenizers(tmp_dir=None):
    """(tokenizer, tokenizer_2): a RobertaTokenizer (CLAP text tower, model_max_length
    CLAP_MAX_LENGTH) and a T5Tokenizer (model_max_length T5_MAX_LENGTH), built offline with the
    `tokenizers` library. Both are transformers 5's tokenizers-backed classes (RobertaTokenizerFast /
    T5TokenizerFast are aliases of them), as the pipeline's isinstance checks require.

    With ``tmp_dir`` they are saved to ``tmp_dir/tokenizer`` and ``tmp_dir/tokenizer_2`` and the
    reloaded copies are returned (exactly what ``from_pretrained`` of a saved pipeline yields).
    """
    from transformers import RobertaTokenizer, T5Tokenizer

    tokenizer = _build_roberta_style(CLAP_MAX_LENGTH)
    tokenizer_2 = _build_t5_style(T5_MAX_LENGTH)
    if tmp_dir is not None:
        from pathlib import Path

        tmp_dir = Path(tmp_dir)
        tokenizer.save_pretrained(tmp_dir / "tokenizer")
        tokenizer_2.save_pretrained(tmp_dir / "tokenizer_2")
        tokenizer = RobertaTokenizer.from_pretrained(tmp_dir / "tokenizer")
        tokenizer_2 = T5Tokenizer.from_pretrained(tmp_dir / "tokenizer_2")
    return tokenizer, tokenizer_2


def _tiny_scheduler_config() -> dict:
    import json
    from importlib import resources

    text = resources.files("litefocus").joinpath("configs", "scheduler.json").read_text()
    return json.loads(text)


def make_tiny_pipeline_components(seed: int = 0, gpt2_positions: int | None = None) -> dict:
    """Every AudioLDM2Pipeline component, tiny and random (seeded; the global RNG is untouched).
    ``gpt2_positions``: the language model's n_positions instead of TINY_GPT2_CONFIG's.

    The language model is a GPT2LMHeadModel (not the GPT2Model the cvssp checkpoints ship):
    diffusers 0.42's ``generate_language_model`` calls ``_update_model_kwargs_for_generation``,
    which transformers 5 only provides on generation-capable classes.
    """
    from diffusers import AudioLDM2ProjectionModel, DDIMScheduler
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5EncoderModel,
    )

    tokenizer, tokenizer_2 = make_tiny_tokenizers()
    clap_config = ClapConfig(
        text_config=ClapTextConfig(vocab_size=len(tokenizer), **TINY_CLAP_TEXT_CONFIG).to_dict(),
        audio_config=ClapAudioConfig(**TINY_CLAP_AUDIO_CONFIG).to_dict(),
        projection_dim=CLAP_PROJECTION_DIM,
    )
    t5_config = T5Config(vocab_size=len(tokenizer_2), **TINY_T5_CONFIG)
    gpt2_config = GPT2Config(
        **{**TINY_GPT2_CONFIG, **({"n_positions": gpt2_positions} if gpt2_positions else {})}
    )
    # Read by generate_language_model when the caller passes no max_new_tokens. A plain extra config
    # attribute (not a GenerationConfig field in transformers 5), so it survives save/load.
    gpt2_config.max_new_tokens = GPT2_MAX_NEW_TOKENS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = ClapModel(clap_config).eval()
        text_encoder_2 = T5EncoderModel(t5_config).eval()
        projection_model = AudioLDM2ProjectionModel(
            text_encoder_dim=CLAP_PROJECTION_DIM,
            text_encoder_1_dim=T5_DIM,
            langauge_model_dim=GPT2_DIM,
        ).eval()
        language_model = GPT2LMHeadModel(gpt2_config).eval()

    return {
        "vae": make_tiny_vae(seed),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "projection_model": projection_model,
        "language_model": language_model,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "feature_extractor": ClapFeatureExtractor(**TINY_FEATURE_EXTRACTOR_CONFIG),
        "unet": make_tiny_unet(seed),
        "scheduler": DDIMScheduler.from_config(_tiny_scheduler_config()),
        "vocoder": make_tiny_vocoder(seed),
    }


def make_tiny_pipeline(seed: int = 0, gpt2_positions: int | None = None):
    from diffusers import AudioLDM2Pipeline

    pipe = AudioLDM2Pipeline(**make_tiny_pipeline_components(seed, gpt2_positions))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path, seed: int = 0, gpt2_positions: int | None = None):
    """Write the tiny pipeline with save_pretrained; AudioLDM2Pipeline.from_pretrained(path) loads
    it back offline. Returns the in-memory pipeline that was saved."""
    pipe = make_tiny_pipeline(seed, gpt2_positions)
    pipe.save_pretrained(path)
    return pipe


def tiny_decode_onnx(path, contract) -> None:
    import numpy as np

    """latent -> flatten -> tile 5x = a waveform of the contract's length (640 samples per frame)."""
    import onnx
    from onnx import TensorProto, helper

    (latent,), (wave,) = contract.inputs, contract.outputs
    repeats = wave.shape[1] // int(np.prod(latent.shape))
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["latent", "flat_shape"], ["flat"]),
            helper.make_node("Tile", ["flat", "repeats"], ["waveform"]),
        ],
        "tiny_decode",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, latent.shape)],
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, wave.shape)],
        initializer=[
            helper.make_tensor("flat_shape", TensorProto.INT64, [2], [1, -1]),
            helper.make_tensor("repeats", TensorProto.INT64, [2], [1, repeats]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
