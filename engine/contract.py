"""Export contracts: the one description of each exportable module's inputs and outputs.

Export, the graph audit, validation, the TensorRT profile, the runtime's buffer allocation and the
tests all read these; nothing else restates a name, dtype or shape. Torch-free: the serving path
reads them; ``torch_dtype`` and ``sample_inputs`` (export and tests) import torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from litefocus.buckets import LATENT_CHANNELS, LATENT_FREQ_BINS, Bucket
from litefocus.config import LiteFocusConfig

PRECISIONS = {"fp32": "float32", "fp16": "float16"}
# Validation tolerance: max |onnx - torch| / rms(torch) per output, by module and precision.
# decode fp32 is looser: the decode runs every VAE level and a 55M-parameter vocoder over the whole
# clip (measured, random weights, fused attention: 2.1e-5 at 10 s, 4.0e-5 at 40 s). Its GroupNorms'
# groups grow with the length; the export computes the large ones in two levels
# (export/group_norm.py), because ONNX Runtime's single-op GroupNorm lost precision with the group
# size (1.7e-4 at 40 s, 4.1e-3 at 320 s), so one flat bound holds at every length.
TOLERANCES = {"unet": {"fp32": 1e-4, "fp16": 2e-2}, "decode": {"fp32": 1e-3, "fp16": 2e-2}}
GPT2_TOKENS = 8  # AudioLDM2's language model generates 8 conditioning tokens
# How a graph's attention is expressed (recorded per module in the manifest):
#   "fused": ONNX Runtime's com.microsoft.MultiHeadAttention (tiled; ONNX Runtime only),
#   "plain": MatMul-Softmax-MatMul (any ONNX runtime; TensorRT fuses it itself).
ATTENTION_FORMS = ("fused", "plain")
# How a graph's 3x3 convolutions are expressed (recorded per module in the manifest):
#   "winograd": F(4x4, 3x3) / F(2x2, 3x3) out of plain ops (export/winograd.py; ONNX Runtime's CPU EP),
#   "direct": one Conv node each (GPUs: cuDNN and TensorRT choose Winograd kernels themselves).
CONV_FORMS = ("direct", "winograd")
CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OP = CONTRIB_DOMAIN, "MultiHeadAttention"
# The GPU graph form (export/gpu_form.py), chosen per export and recorded per module in the manifest
# as its "gpu_ops": which of ONNX Runtime's CUDA-only contrib ops the graph was written with.
#   "nhwc": channels-last maps end to end: NhwcConv and GroupNorm (with its SiLU fused);
#   "skip_group_norm": the ResNet's conv1 + time-embedding add feeding norm2 as one SkipGroupNorm;
#   "bias_split_gelu": the GEGLU feed-forward's bias, split and GELU as one BiasSplitGelu;
#   "packed_attention": MultiHeadAttention on one packed QKV / KV projection, cross-attention fused too.
# A graph with any of these runs on the CUDA EP only. () is the form every EP runs.
GPU_OPS = ("nhwc", "skip_group_norm", "bias_split_gelu", "packed_attention")
GPU_CONTRIB_OPS = {  # the contrib ops each piece adds to a graph (MultiHeadAttention: any fused graph)
    "nhwc": ("NhwcConv", "GroupNorm"),
    "skip_group_norm": ("SkipGroupNorm",),
    "bias_split_gelu": ("BiasSplitGelu",),
    "packed_attention": (),
}

DEFAULT_TEXT_LEN = 128  # Flan-T5 tokens, padded + masked
MODULES = ("unet", "decode")  # the exported modules of every bucket entry, in build order


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def index_input_name(freq_bins: int) -> str:
    return f"litefocus_indices_f{freq_bins}"


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


class _Contract:
    """What every contract offers on top of its ``inputs`` / ``outputs`` specs (properties)."""

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> static shape of every input and output (the TensorRT profile uses the inputs)."""
        return {s.name: s.shape for s in (*self.inputs, *self.outputs)}

    def to_dict(self) -> dict:
        """What the manifest records of the contract (the runtime rebuilds and compares it)."""
        return {
            "module": self.module,
            "batch": self.batch,
            "precision": self.precision,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    @property
    def tolerance(self) -> float:
        """Max validation error relative to the output RMS (see TOLERANCES)."""
        return TOLERANCES[self.module][self.precision]

    def numpy_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.sample_inputs(seed).items()}


@dataclass(frozen=True)
class UNetContract(_Contract):
    """One UNet call for one bucket: noise_pred = unet(sample, timestep, conditioning[, indices]).

    Every row is independent: its own timestep [B] and, per LiteFocus level, its own global samples
    [B, layers, S], so requests at different steps batch into one call (step-level batching).
    ``index_levels``: (freq_bins, layers) for each LiteFocus level whose global sample is an engine
    input (``index_mode="resample"``); empty when LiteFocus is off or its samples are baked in.
    """

    module: ClassVar[str] = "unet"
    bucket: Bucket
    batch: int = 2
    text_len: int = DEFAULT_TEXT_LEN
    gpt2_dim: int = 768
    t5_dim: int = 1024
    precision: str = "fp32"
    litefocus: LiteFocusConfig | None = field(default_factory=LiteFocusConfig)
    index_levels: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        _check_precision(self.precision)
        for name in ("batch", "text_len", "gpt2_dim", "t5_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetContract.{name} must be a positive int, got {value!r}")
        if self.index_levels and (self.litefocus is None or self.litefocus.index_mode != "resample"):
            raise ValueError("UNetContract: index inputs exist only with LiteFocus in index_mode='resample'")

    @property
    def float_dtype(self) -> str:
        return PRECISIONS[self.precision]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        b, f = self.batch, self.float_dtype
        specs = [
            TensorSpec("sample", (b, *self.bucket.latent_shape), f),
            TensorSpec("timestep", (b,), "float32"),
            TensorSpec("encoder_hidden_states", (b, GPT2_TOKENS, self.gpt2_dim), f),
            TensorSpec("encoder_hidden_states_1", (b, self.text_len, self.t5_dim), f),
            TensorSpec("encoder_attention_mask_1", (b, self.text_len), "int32"),
        ]
        for freq_bins, layers in self.index_levels:
            s = self.bucket.num_global(self.litefocus, freq_bins)
            specs.append(TensorSpec(index_input_name(freq_bins), (b, layers, s), "int32"))
        return tuple(specs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("noise_pred", (self.batch, *self.bucket.latent_shape), self.float_dtype),)

    def sample_inputs(self, seed: int = 0) -> dict:
        """Fresh random inputs (torch tensors) that satisfy the contract (valid masks and index samples)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.inputs:
            if spec.name == "timestep":
                out[spec.name] = torch.randint(1, 1000, spec.shape, generator=g).float()
            elif spec.name == "encoder_attention_mask_1":
                lengths = torch.randint(1, self.text_len + 1, (self.batch,), generator=g)
                mask = torch.arange(self.text_len)[None, :] < lengths[:, None]
                out[spec.name] = mask.to(torch.int32)
            elif spec.name.startswith("litefocus_indices"):
                b, layers, s = spec.shape
                n = self.bucket.tokens(int(spec.name.rsplit("_f", 1)[1]))
                rows = [torch.randperm(n, generator=g)[:s] for _ in range(b * layers)]
                out[spec.name] = torch.stack(rows).reshape(b, layers, s).to(torch.int32)
            else:
                out[spec.name] = torch.randn(spec.shape, generator=g).to(spec.torch_dtype)
        return out

    def to_dict(self) -> dict:
        return {**super().to_dict(), "text_len": self.text_len}


@dataclass(frozen=True)
class DecodeContract(_Contract):
    """VAE decoder + vocoder for one bucket: waveform = vocoder(vae.decode(latent / scaling_factor)).

    ``window_frames``: time-chunked decode (an export option, never on by itself): the graph takes
    windows of this many latent frames, and the bucket's latent is decoded window by window with
    ``overlap_frames`` of cross-fade between neighbours (``litefocus.engine.chunking``).
    """

    module: ClassVar[str] = "decode"
    bucket: Bucket
    batch: int = 1
    precision: str = "fp32"
    window_frames: int | None = None
    overlap_frames: int = 0

    def __post_init__(self) -> None:
        _check_precision(self.precision)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"DecodeContract.batch must be a positive int, got {self.batch!r}")
        if self.window_frames is None:
            if self.overlap_frames:
                raise ValueError("DecodeContract.overlap_frames needs window_frames")
            return
        w, o = self.window_frames, self.overlap_frames
        for name, v in (("window_frames", w), ("overlap_frames", o)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"DecodeContract.{name} must be an int, got {v!r}")
        if not 1 <= w < self.bucket.frames:
            raise ValueError(
                f"DecodeContract.window_frames must be in 1..{self.bucket.frames - 1} (shorter than the "
                f"bucket), got {w}"
            )
        if not 0 <= 2 * o < w:
            raise ValueError(f"DecodeContract.overlap_frames must be in 0..{(w - 1) // 2}, got {o}")

    @property
    def graph_frames(self) -> int:
        """Latent frames the graph takes: the window's, or the whole bucket's."""
        return self.window_frames or self.bucket.frames

    @property
    def samples_per_frame(self) -> int:
        return self.bucket.samples // self.bucket.frames

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(
                "latent",
                (self.batch, LATENT_CHANNELS, self.graph_frames, LATENT_FREQ_BINS),
                PRECISIONS[self.precision],
            ),
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        samples = self.graph_frames * self.samples_per_frame
        return (TensorSpec("waveform", (self.batch, samples), PRECISIONS[self.precision]),)

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.window_frames is not None:
            d.update(window_frames=self.window_frames, overlap_frames=self.overlap_frames)
        return d

    def sample_inputs(self, seed: int = 0) -> dict:
        import torch

        g = torch.Generator().manual_seed(seed)
        return {s.name: torch.randn(s.shape, generator=g).to(s.torch_dtype) for s in self.inputs}


TOLERANCES["conditioning"] = {"fp32": 1e-4}


@dataclass(frozen=True)
class ConditioningContract(_Contract):
    """AudioLDM2's text conditioning for one CFG pair [negative, prompt], token ids -> UNet inputs.

    CLAP (RoBERTa ids padded to ``clap_len``) + Flan-T5 (ids padded to ``text_len``) -> projection
    -> GPT-2 (8 generated states). The outputs carry the UNet's input names. fp32 only.
    """

    module: ClassVar[str] = "conditioning"
    clap_len: int
    text_len: int
    gpt2_dim: int
    t5_dim: int
    batch: int = 2
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision != "fp32":
            raise ValueError(f"ConditioningContract.precision must be 'fp32', got {self.precision!r}")
        for name in ("clap_len", "text_len", "gpt2_dim", "t5_dim", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConditioningContract.{name} must be a positive int, got {value!r}")
        if self.batch != 2:
            raise ValueError(f"ConditioningContract.batch must be 2 (the CFG pair), got {self.batch!r}")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        b = self.batch
        return (
            TensorSpec("clap_input_ids", (b, self.clap_len), "int64"),
            TensorSpec("clap_attention_mask", (b, self.clap_len), "int64"),
            TensorSpec("t5_input_ids", (b, self.text_len), "int64"),
            TensorSpec("t5_attention_mask", (b, self.text_len), "int64"),
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        b = self.batch
        return (
            TensorSpec("encoder_hidden_states", (b, GPT2_TOKENS, self.gpt2_dim), "float32"),
            TensorSpec("encoder_hidden_states_1", (b, self.text_len, self.t5_dim), "float32"),
        )

    def to_dict(self) -> dict:
        return {**super().to_dict(), "clap_len": self.clap_len, "text_len": self.text_len}

    @classmethod
    def from_dict(cls, d: dict) -> ConditioningContract:
        """Rebuild from ``to_dict()``; ValueError when the record is not one this version writes."""
        try:
            shapes = {s["name"]: s["shape"] for s in (*d["outputs"], *d["inputs"])}
            contract = cls(
                clap_len=d["clap_len"],
                text_len=d["text_len"],
                gpt2_dim=shapes["encoder_hidden_states"][2],
                t5_dim=shapes["encoder_hidden_states_1"][2],
                batch=d["batch"],
                precision=d["precision"],
            )
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"not a conditioning contract ({type(e).__name__}: {str(e)[:80]})") from None
        if contract.to_dict() != d:
            raise ValueError("the conditioning contract does not match this litefocus version's")
        return contract

    def sample_inputs(self, seed: int = 0, vocab_sizes: tuple[int, int] = (32, 32)) -> dict:
        """Random token ids below ``vocab_sizes`` (CLAP, T5) with right-padded masks, as the runner
        feeds them: the prompt row (1) holds the longest T5 sequence, the negative row (0) at most as many."""
        import torch

        g = torch.Generator().manual_seed(seed)
        b = self.batch

        def ids(vocab: int, length: int):
            return torch.randint(0, vocab, (b, length), generator=g, dtype=torch.int64)

        def prefix_mask(lengths, length: int):
            return (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)

        clap_lengths = torch.randint(min(2, self.clap_len), self.clap_len + 1, (b,), generator=g)
        prompt_len = int(torch.randint(1, self.text_len + 1, (1,), generator=g))
        t5_lengths = torch.randint(1, prompt_len + 1, (b,), generator=g)
        t5_lengths[-1] = prompt_len
        return {
            "clap_input_ids": ids(vocab_sizes[0], self.clap_len),
            "clap_attention_mask": prefix_mask(clap_lengths, self.clap_len),
            "t5_input_ids": ids(vocab_sizes[1], self.text_len),
            "t5_attention_mask": prefix_mask(t5_lengths, self.text_len),
        }
