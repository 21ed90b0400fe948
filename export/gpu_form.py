"""The GPU graph form: the UNet and the VAE written with ONNX Runtime's CUDA contrib ops, channels-last.

ONNX Runtime's own Stable Diffusion work on the CUDA EP gained, in order, from fused attention,
NhwcConv, GroupNorm (NHWC, SiLU fused), BiasSplitGelu, packed QKV and BiasAdd. Our exporter writes
every node itself, so the fast form is emitted while the graph is traced (trace-time module swaps,
like ``geglu.py``), not pattern-matched afterwards:

  * ``nhwc``: every 2-D convolution is an ``NhwcConv`` and every GroupNorm of a map a contrib
    ``GroupNorm`` on channels-last maps; a ResNet block's norm + SiLU is one node (``activation=1``).
    Each swapped module keeps its NCHW interface, with a Transpose pair at its edges; ``layout.py``
    then cancels the pairs through the ops between blocks (Add, Concat, ...), so maps stay NHWC from
    the first convolution to the last;
  * ``skip_group_norm``: a ResNet block's ``conv1 + bias + time embedding -> norm2 -> SiLU`` is one
    ``SkipGroupNorm`` (conv1 without its bias, which becomes the node's bias input);
  * ``bias_split_gelu``: the GEGLU feed-forward's projection is a bias-free MatMul and one
    ``BiasSplitGelu`` (bias add, split, erf-GELU gate, product);
  * ``packed_attention``: MultiHeadAttention on one projection per attention (packed QKV, packed
    KV for LiteFocus and cross-attention) and cross-attention fused too (``gpu_attention.py``).

The LiteFocus static form is the same computation in every piece (the audit checks its [T, T + S]
shapes); without ``packed_attention`` attention is ``fused.py``'s. Each piece
is chosen per export (``GPU_OPS``) so its effect can be measured alone. The eager forward of every
swapped module is the computation the graph is validated against; the contrib ops' numpy twins for
``onnx.reference`` are in ``reference_ops.py``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from litefocus.engine.contract import GPU_OPS
from litefocus.export.contrib import bias_split_gelu, group_norm_nhwc, nhwc_conv, skip_group_norm_nhwc
from litefocus.export.gpu_attention import packed_attention_processors
from litefocus.export.swap import swapped


def to_nhwc(x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, H, W, C]
    return x.permute(0, 2, 3, 1)


def to_nchw(x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, C, H, W]
    return x.permute(0, 3, 1, 2)


# What ONNX Runtime's CUDA kernels take (checked when the session runs, so the exporter emits a contrib
# op only where its kernel will run): GroupNorm and SkipGroupNorm need an even number of channels per
# group, at most 512; BiasSplitGelu only inputs [B, N, 2D] of width 2D = 2560, 5120 or 10240
# (group_norm_common_base.cc, bias_split_gelu.cc). AudioLDM2 fits GroupNorm everywhere (4-40 channels
# per group) and BiasSplitGelu at its 640-channel level and mid block (2D = 5120); elsewhere the plain
# form stays. The audit checks the graph against the same limits.
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 10240)
MAX_CHANNELS_PER_GROUP = 512

# What ``--gpu-ops auto`` picks for a GPU export: nothing yet. The form is proven on the CPU (the tiny
# graphs against PyTorch through onnx.reference), not yet run on the CUDA EP, so a default export stays
# on the measured CUDA form until bench/gpu/run.sh C has validated and timed it on a lent GPU; then this
# becomes GPU_OPS (or the pieces that paid). Asked for explicitly, the form is exported and validated.
AUTO_GPU_OPS: tuple[str, ...] = ()


def group_norm_ok(norm: torch.nn.GroupNorm, channels: int | None = None) -> bool:
    return norm.affine and group_norm_kernel_takes(channels or norm.num_channels, norm.num_groups)


def group_norm_kernel_takes(channels: int, groups: int) -> bool:
    per_group = channels // groups
    return channels % groups == 0 and per_group % 2 == 0 and per_group <= MAX_CHANNELS_PER_GROUP


class _Opaque(torch.nn.Module):
    """A swap that computes its wrapped module's children itself: later swaps leave them alone."""

    swap_opaque = True


class NhwcConv2d(_Opaque):
    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(nhwc_conv(to_nhwc(x), self.conv))


class NhwcGroupNorm(_Opaque):
    """A GroupNorm of a 4-D map as the contrib op (+ SiLU); other ranks keep the module itself."""

    def __init__(self, norm: torch.nn.GroupNorm, silu: bool = False):
        super().__init__()
        self.norm = norm
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not group_norm_ok(self.norm):
            y = self.norm(x)
            return F.silu(y) if self.silu else y
        return to_nchw(group_norm_nhwc(to_nhwc(x), self.norm, silu=self.silu))


def fusable_resnet(block: ResnetBlock2D) -> bool:
    """A ResNet block of the default kind (what AudioLDM2's UNet and VAE use): SiLU, an additive time
    embedding or none (the VAE's), affine GroupNorms, no up/down-sampling inside."""
    additive = block.time_embedding_norm == "default"
    no_temb = block.time_emb_proj is None and block.time_embedding_norm != "scale_shift"
    return (
        isinstance(block.nonlinearity, torch.nn.SiLU)
        and (additive or no_temb)
        and block.upsample is None
        and block.downsample is None
        and isinstance(block.norm1, torch.nn.GroupNorm)
        and isinstance(block.norm2, torch.nn.GroupNorm)
        and group_norm_ok(block.norm1)
        and group_norm_ok(block.norm2)
    )


class FusedResnet(_Opaque):
    """``ResnetBlock2D.forward`` (default path) on channels-last maps with fused norms.

    x: [B, C, H, W] at the edges (``layout.py`` cancels the Transpose pairs between blocks)."""

    def __init__(self, block: ResnetBlock2D, skip_norm: bool):
        super().__init__()
        self.block = block
        self.skip_norm = skip_norm

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        blk = self.block
        h = to_nhwc(x)  # h: [B, H, W, C]
        shortcut = h
        h = group_norm_nhwc(h, blk.norm1, silu=True)
        t = None
        if temb is not None and blk.time_emb_proj is not None:
            t = blk.time_emb_proj(temb if blk.skip_time_act else blk.nonlinearity(temb))[:, None, None, :]
        if t is not None and self.skip_norm and blk.conv1.bias is not None:
            h = nhwc_conv(h, blk.conv1, bias=False)  # the bias joins the SkipGroupNorm
            h = skip_group_norm_nhwc(h, t, blk.conv1.bias, blk.norm2, silu=True)
        else:
            h = nhwc_conv(h, blk.conv1)
            h = group_norm_nhwc(h if t is None else h + t, blk.norm2, silu=True)
        h = nhwc_conv(blk.dropout(h), blk.conv2)
        if blk.conv_shortcut is not None:
            shortcut = nhwc_conv(shortcut, blk.conv_shortcut)
        return to_nchw((shortcut + h) / blk.output_scale_factor)


class NhwcUpsample(_Opaque):
    """``Upsample2D`` (nearest 2x, then its conv) on channels-last maps: the 2x repeat is an Expand."""

    def __init__(self, up: Upsample2D):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        up = self.up
        b, c, hh, ww = x.shape
        if output_size is not None and tuple(output_size) != (2 * hh, 2 * ww):
            return up(x, output_size)
        h = to_nhwc(x)[:, :, None, :, None, :]  # [B, H, 1, W, 1, C]
        h = h.expand(b, hh, 2, ww, 2, c).reshape(b, 2 * hh, 2 * ww, c)
        if up.use_conv:
            h = nhwc_conv(h, up.conv if up.name == "conv" else up.Conv2d_0)
        return to_nchw(h)


def nhwc_upsample_ok(up: Upsample2D) -> bool:
    return up.interpolate and not up.use_conv_transpose and up.norm is None


class SplitGeluGEGLU(_Opaque):
    """GEGLU as a bias-free projection and one BiasSplitGelu node (same weights)."""

    def __init__(self, inner: GEGLU):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = self.inner.proj
        bias = proj.bias if proj.bias is not None else hidden_states.new_zeros(proj.out_features)
        return bias_split_gelu(F.linear(hidden_states, proj.weight), bias)  # [B, N, 2D] -> [B, N, D]


def bias_split_gelu_ok(geglu: GEGLU) -> bool:
    return geglu.proj.out_features in BIAS_SPLIT_GELU_WIDTHS  # the node's input width, 2D


def _maybe(cond, wrap):
    return lambda m: wrap(m) if cond(m) else m


@contextlib.contextmanager
def _out_norms(models: tuple[torch.nn.Module, ...]):
    """Each ``conv_norm_out`` GroupNorm followed by a SiLU ``conv_act`` (the UNet's and the VAE
    decoder's last norm) as one GroupNorm node with the SiLU fused; put back after."""
    found = []
    for model in models:
        for parent in model.modules():
            norm, act = getattr(parent, "conv_norm_out", None), getattr(parent, "conv_act", None)
            if type(norm) is torch.nn.GroupNorm and isinstance(act, torch.nn.SiLU) and group_norm_ok(norm):
                found.append((parent, norm, act))
    try:
        for parent, norm, _ in found:
            parent.conv_norm_out, parent.conv_act = NhwcGroupNorm(norm, silu=True), torch.nn.Identity()
        yield len(found)
    finally:
        for parent, norm, act in found:
            parent.conv_norm_out, parent.conv_act = norm, act


def add_gpu_ops_argument(parser, help: str) -> None:
    """``--gpu-ops`` on a command line (litefocus-export, litefocus-bench); ``parse_gpu_ops`` reads it."""
    parser.add_argument(
        "--gpu-ops", nargs="+", choices=["auto", "none", *GPU_OPS], default=["auto"], metavar="OP", help=help
    )


def parse_gpu_ops(values: list[str]):
    """A command line's ``--gpu-ops`` words: "auto", "none" or a tuple of pieces (checked)."""
    if values and values[0] in ("auto", "none") and len(values) == 1:
        return values[0]
    if {"auto", "none"} & set(values):
        raise ValueError(f"--gpu-ops {' '.join(values)}: auto and none stand alone; or list the pieces")
    return check_gpu_ops(values)


def check_gpu_ops(ops) -> tuple[str, ...]:
    """``ops`` validated, in ``GPU_OPS`` order."""
    ops = tuple(ops)
    unknown = sorted(set(ops) - set(GPU_OPS))
    if unknown:
        raise ValueError(f"unknown GPU graph op(s) {unknown}; choose from {', '.join(GPU_OPS)}")
    if "skip_group_norm" in ops and "nhwc" not in ops:
        raise ValueError(
            "gpu op skip_group_norm needs nhwc (SkipGroupNorm takes channels-last maps); add nhwc"
        )
    return tuple(o for o in GPU_OPS if o in ops)


def resolve_gpu_ops(
    gpu_ops, backend: str, device: str, conv: str, attention: str = "fused"
) -> tuple[str, ...]:
    """auto -> ``gpu_form.AUTO_GPU_OPS`` for ONNX Runtime engines exported on a GPU (none until the
    form is measured there), none otherwise. The form runs on the CUDA EP only, and the export
    validates every graph on it: asking for a piece elsewhere is an error naming the fix."""
    on_gpu = device.startswith("cuda")
    if gpu_ops == "auto":
        return AUTO_GPU_OPS if on_gpu and backend != "tensorrt" and conv != "winograd" else ()
    ops = check_gpu_ops(() if gpu_ops in ("none", None) else gpu_ops)
    if ops and backend == "tensorrt":
        raise ValueError(
            "--gpu-ops: the TensorRT parser takes no ONNX Runtime contrib ops; use --gpu-ops none"
        )
    if ops and not on_gpu:
        raise ValueError(
            f"--gpu-ops {' '.join(ops)}: these contrib ops run only on ONNX Runtime's CUDA EP, where the "
            "export validates them; export with --device cuda, or use --gpu-ops none"
        )
    if "packed_attention" in ops and attention == "plain":
        raise ValueError(
            "--gpu-ops packed_attention packs the fused attention node; use --attention fused (or auto)"
        )
    if "nhwc" in ops and conv == "winograd":
        raise ValueError("--gpu-ops nhwc writes every convolution as NhwcConv; use --conv direct (or auto)")
    return ops


@contextlib.contextmanager
def gpu_form(*models: torch.nn.Module, ops=GPU_OPS):
    """Inside: ``models`` trace in the GPU form with the pieces ``ops`` (see the module docstring);
    every module is put back after. Enter it before the other trace-time swaps (``split_geglu``,
    ``precise_group_norm``): the modules it takes are hidden from them."""
    ops = check_gpu_ops(ops)
    with contextlib.ExitStack() as stack:
        if "bias_split_gelu" in ops:
            # diffusers' GEGLU gates with erf-GELU, as BiasSplitGelu does
            stack.enter_context(swapped(models, GEGLU, _maybe(bias_split_gelu_ok, SplitGeluGEGLU)))
        if "packed_attention" in ops:
            stack.enter_context(packed_attention_processors(*models))
        if "nhwc" in ops:
            skip = "skip_group_norm" in ops
            stack.enter_context(
                swapped(models, ResnetBlock2D, _maybe(fusable_resnet, lambda b: FusedResnet(b, skip)))
            )
            stack.enter_context(swapped(models, Upsample2D, _maybe(nhwc_upsample_ok, NhwcUpsample)))
            stack.enter_context(_out_norms(models))
            stack.enter_context(swapped(models, torch.nn.GroupNorm, NhwcGroupNorm))
            stack.enter_context(swapped(models, torch.nn.Conv2d, _maybe(_plain_conv, NhwcConv2d)))
        yield ops


def _plain_conv(conv: torch.nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
