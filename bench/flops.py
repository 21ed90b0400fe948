"""Analytic FLOPs of one AudioLDM2 UNet forward, with or without LiteFocus, from the module tree.

    from litefocus.bench.flops import unet_step_flops
    unet_step_flops(random_unet("audioldm2", device="meta"), Bucket.for_seconds(80))

Nothing is run: the UNet is walked level by level (diffusers' AudioLDM2UNet2DConditionModel layout)
and every matmul-like op is priced at 2 FLOPs per multiply-add, the convention of
``torch.utils.flop_counter.FlopCounterMode``. Counted, exactly as FlopCounterMode counts them:

* every ``nn.Conv2d`` (conv_in/out, resnets, shortcuts, 1x1 proj_in/out, down/up samplers):
  2 * B * H_out * W_out * C_out * C_in/groups * kh * kw; the bias add is NOT counted;
* every ``nn.Linear`` (time embedding, resnet time_emb_proj on B rows, attention projections,
  GEGLU feed-forward): 2 * rows * in * out; bias NOT counted;
* the attention core (QK^T and PV): 4 * B * heads * L_q * L_k * D. Self-attention L_k = N of its
  level (LiteFocus layers: T_level + S, or S with same_frequency off); cross-attention L_k = 8 GPT-2
  tokens for the first two transformers of a layer and ``text_len`` T5 tokens for the third.

Not counted (FlopCounterMode does not either): norms, activations, softmax, scaling, residual
adds, interpolation, gathers. Note: on CPU FlopCounterMode sees the fused SDPA kernel as 0 FLOPs;
compare under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (or on meta / CUDA tensors),
where SDPA is priced as its two bmm's. All numbers are returned in FLOPs (not GFLOP).
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from litefocus.buckets import LATENT_FREQ_BINS, Bucket
from litefocus.config import LiteFocusConfig
from litefocus.engine.contract import GPT2_TOKENS


def _conv_flops(conv: nn.Conv2d, batch: int, h: int, w: int) -> tuple[int, int, int]:
    """(FLOPs, H_out, W_out) of ``conv`` applied to a [batch, C, h, w] input."""
    out = []
    for size, k, s, p, d in zip(
        (h, w), conv.kernel_size, conv.stride, conv.padding, conv.dilation, strict=True
    ):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    kh, kw = conv.kernel_size
    macs = batch * out[0] * out[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return 2 * macs, out[0], out[1]


def _linear_flops(linear: nn.Linear, rows: int) -> int:
    return 2 * rows * linear.in_features * linear.out_features


def _ceil_half(hw: tuple[int, int]) -> tuple[int, int]:
    return (-(-hw[0] // 2), -(-hw[1] // 2))


def unet_step_flops(
    unet,
    bucket_or_frames: Bucket | int,
    *,
    batch: int = 2,
    text_len: int = 128,
    litefocus: LiteFocusConfig | None = None,
    latent_freq_bins: int = LATENT_FREQ_BINS,
) -> dict:
    """Analytic FLOPs of one UNet forward on a [batch, C, frames, latent_freq_bins] latent.

    ``bucket_or_frames``: a Bucket (its padded frames) or latent frames as an int (any T >= 1, e.g.
    250 for an unpadded 10 s; levels then round up as the stride-2 convs do).
    ``litefocus``: price the self-attention modules at ``litefocus.freq_bins`` levels as LiteFocus.

    Returns FLOPs: ``total``; ``self_attention`` / ``cross_attention`` (attention cores only:
    QK^T + PV); ``self_attention_litefocus_level`` (cores of the self-attention modules at the
    LiteFocus levels: ``litefocus.freq_bins``, or the default (8,) with LiteFocus off); ``conv``,
    ``linear`` (all convs / linears, projections included); ``by_freq_bins`` {F: FLOPs of the
    self-attention cores at that level}; ``frames``; ``num_global`` {F: S} with LiteFocus.
    """
    frames = bucket_or_frames.frames if isinstance(bucket_or_frames, Bucket) else int(bucket_or_frames)
    if frames < 1 or batch < 1 or text_len < 1:
        raise ValueError(f"frames, batch and text_len must be positive, got {frames}, {batch}, {text_len}")
    focus_bins = litefocus.freq_bins if litefocus is not None else LiteFocusConfig().freq_bins
    acc: dict[str, int] = defaultdict(int)
    by_bins: dict[int, int] = defaultdict(int)
    num_global: dict[int, int] = {}

    def conv(m: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
        flops, h, w = _conv_flops(m, batch, *hw)
        acc["conv"] += flops
        return h, w

    def linear(m: nn.Linear, rows: int) -> None:
        acc["linear"] += _linear_flops(m, rows)

    def resnet(r, hw: tuple[int, int]) -> None:
        conv(r.conv1, hw)
        conv(r.conv2, hw)
        if r.time_emb_proj is not None:
            linear(r.time_emb_proj, batch)  # on temb [B, C]
        if r.conv_shortcut is not None:
            conv(r.conv_shortcut, hw)

    def attention(a, hw: tuple[int, int], enc_len: int | None) -> None:
        t, f = hw
        n = t * f
        kv_rows = batch * (enc_len if a.is_cross_attention else n)
        linear(a.to_q, batch * n)
        linear(a.to_k, kv_rows)
        linear(a.to_v, kv_rows)
        linear(a.to_out[0], batch * n)
        inner = a.to_q.out_features  # heads * D
        if a.is_cross_attention:
            acc["cross_attention"] += 4 * batch * n * enc_len * inner
            return
        keys = n
        if litefocus is not None and f in litefocus.freq_bins:
            s = litefocus.num_global(n)
            num_global[f] = s
            keys = (t if litefocus.same_frequency else 0) + s
        core = 4 * batch * n * keys * inner
        acc["self_attention"] += core
        by_bins[f] += core
        if f in focus_bins:
            acc["self_attention_litefocus_level"] += core

    def transformer(tr, hw: tuple[int, int], enc_len: int | None) -> None:
        n = hw[0] * hw[1]
        for proj in (tr.proj_in, tr.proj_out):
            conv(proj, hw) if isinstance(proj, nn.Conv2d) else linear(proj, batch * n)
        for block in tr.transformer_blocks:
            for name, m in block.named_children():
                if name.startswith("attn") and m is not None:
                    attention(m, hw, enc_len if m.is_cross_attention else None)
            for m in block.ff.modules():
                if isinstance(m, nn.Linear):
                    linear(m, batch * n)

    def block_body(block, hw: tuple[int, int]) -> None:
        """Resnets and transformers of one block at resolution ``hw`` (order does not matter)."""
        for r in block.resnets:
            resnet(r, hw)
        attns = getattr(block, "attentions", None) or []
        dims = list(getattr(block, "cross_attention_dim", None) or [])
        for k, tr in enumerate(attns):
            idx = k % len(dims) if dims else 0
            # AudioLDM2 routing: transformers 0-1 of a layer see encoder_hidden_states (GPT-2),
            # transformer 2 sees encoder_hidden_states_1 (T5).
            transformer(tr, hw, GPT2_TOKENS if idx <= 1 else text_len)

    # Time embedding on B rows (the scalar timestep is broadcast to the batch).
    for m in unet.time_embedding.modules():
        if isinstance(m, nn.Linear):
            linear(m, batch)
    hw = conv(unet.conv_in, (frames, latent_freq_bins))
    levels = []
    for block in unet.down_blocks:
        levels.append(hw)
        block_body(block, hw)
        for ds in block.downsamplers or []:
            hw = conv(ds.conv, hw)
    if unet.mid_block is not None:
        block_body(unet.mid_block, hw)
    for i, block in enumerate(unet.up_blocks):
        hw = levels[len(levels) - 1 - i]  # the resolution of the matching skip level
        block_body(block, hw)
        if block.upsamplers:
            target = levels[len(levels) - 2 - i]  # interpolated to the next skip's size, then conv
            for us in block.upsamplers:
                conv(us.conv, target)
    conv(unet.conv_out, levels[0])

    total = acc["conv"] + acc["linear"] + acc["self_attention"] + acc["cross_attention"]
    result = {
        "total": total,
        "self_attention": acc["self_attention"],
        "self_attention_litefocus_level": acc["self_attention_litefocus_level"],
        "cross_attention": acc["cross_attention"],
        "conv": acc["conv"],
        "linear": acc["linear"],
        "by_freq_bins": dict(sorted(by_bins.items(), reverse=True)),
        "frames": frames,
    }
    if litefocus is not None:
        result["num_global"] = num_global
    return result
