"""Packed attention for the GPU graph form: one projection per attention, fused cross-attention.

ONNX Runtime's MultiHeadAttention takes a packed query-key-value [B, L, H, 3, D] (self-attention:
one MatMul instead of three) or a packed key-value [B, Lk, H, 2, D] beside the query (one MatMul
instead of two), and a key padding mask [B, Lk] (1 keep, 0 drop, the rest of the row softmaxed with
``mask_filter_value`` = -10000 added at the dropped keys: exactly diffusers' additive T5 mask).
The ``packed_attention`` piece (``gpu_form.py``) swaps, while a graph is traced:

  * dense self-attention (the UNet's 384- and 640-channel levels and mid block, the VAE's) for
    ``PackedQKVSelfAttn``: the three projections' weights interleaved per head into one;
  * LiteFocus self-attention for a packed key-value projection: ``focus_attention_packed`` folds
    it like k (each row [H, 2, D] keeps its pair), so the [T, T + S] attention reads one tensor;
  * cross-attention (GPT-2 and T5 states) for ``PackedKVCrossAttn``: one fused node where the plain
    form had MatMul -> Softmax -> MatMul over [Lq, Lk] scores.

Each eager forward is the computation the graph is validated against; ``reference_ops.py`` has the
op's numpy twin for these inputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from litefocus.attention import focus_attention_packed
from litefocus.export.contrib import emit, onnx_dtype, static_shape
from litefocus.export.fused import FUSED_OP, AttentionSpec
from litefocus.processor import LiteFocusAttnProcessor, PackedSelfAttnProcessor

MASK_FILTER = -10000.0  # MultiHeadAttention's default mask_filter_value; diffusers' padding bias


class _PackedMHA(torch.autograd.Function):
    """q: [B, L, H, 3, D] (kv None) or q: [B, Lq, H*D] with kv [B, Lk, H, 2, D]; mask [B, Lk] int32."""

    @staticmethod
    def forward(ctx, q, kv, mask, spec: AttentionSpec):
        if kv is None:
            q, k, v = q.unbind(3)  # [B, L, H, D] each
        else:
            b, lq, _ = q.shape
            q = q.reshape(b, lq, spec.heads, -1)
            k, v = kv.unbind(3)
        bias = None
        if mask is not None:  # [B, Lk] -> additive [B, 1, 1, Lk]
            bias = ((1 - mask.to(q.dtype)) * MASK_FILTER)[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=spec.scale
        )  # [B, H, Lq, D]
        return out.transpose(1, 2).reshape(spec.shape)

    @staticmethod
    def symbolic(g, q, kv, mask, spec: AttentionSpec):
        none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        inputs = [q] if kv is None or _is_none(kv) else [q, kv]
        if mask is not None and not _is_none(mask):
            inputs += [none] * (4 - len(inputs)) + [mask]  # value, bias, then key_padding_mask
        return emit(g, FUSED_OP, inputs, [spec.shape], spec.dtype, **spec.attributes())


def _is_none(value) -> bool:
    return value.node().mustBeNone()


def packed_attention(q, kv, heads: int, scale: float, mask=None) -> torch.Tensor:
    """One MultiHeadAttention node on a packed QKV (``kv`` None) or a query and a packed KV."""
    b, lq = static_shape(q)[:2]
    d = q.shape[-1] if kv is None else q.shape[-1] // heads
    shape = (b, lq, heads * int(d))
    return _PackedMHA.apply(q, kv, mask, AttentionSpec(int(heads), float(scale), shape, onnx_dtype(q)))


def _interleaved(heads: int, *linears) -> torch.Tensor:
    """The projections' weights [H*D, C] each -> one [H*n*D, C] whose output is [.., H, n, D]."""
    ws = [lin.weight.reshape(heads, -1, lin.weight.shape[-1]) for lin in linears]  # [H, D, C] each
    return torch.stack(ws, dim=1).reshape(-1, ws[0].shape[-1])


def packable(attn) -> bool:
    """Plain projections (no biases, no per-head norms, no cross norm): what AudioLDM2 has."""
    return (
        all(getattr(attn, n).bias is None for n in ("to_q", "to_k", "to_v"))
        and attn.norm_q is None
        and attn.norm_k is None
        and getattr(attn, "norm_cross", None) is None
        and attn.to_q.weight.shape[0] == attn.to_k.weight.shape[0] == attn.to_v.weight.shape[0]
    )


class PackedQKVSelfAttn(PackedSelfAttnProcessor):
    """Dense self-attention through one projection and one packed-QKV node."""

    fused = True  # fused_attention leaves it as it is

    def __init__(self, name: str = "self-attention"):
        super().__init__(None, name)

    def project(self, attn, x):
        qkv = F.linear(x, _interleaved(attn.heads, attn.to_q, attn.to_k, attn.to_v))  # [B, N, H*3*D]
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, attn.heads, 3, -1), None, None

    def core(self, attn, q, k, v):
        return packed_attention(q, None, attn.heads, attn.scale)


class PackedKVLiteFocus(LiteFocusAttnProcessor):
    """LiteFocus self-attention with one key-value projection, folded and attended packed."""

    fused = True

    def __init__(self, inner: LiteFocusAttnProcessor):
        super().__init__(inner.handle, inner.layer, inner.name, inner.freq_bins, _attend_packed_kv)

    def project(self, attn, x):
        kv = F.linear(x, _interleaved(attn.heads, attn.to_k, attn.to_v))  # [B, N, H*2*D]
        return attn.to_q(x), kv, kv

    def core(self, attn, q, k, v):
        idx = self.handle.layer_indices(self.layer, q.shape[1], k.device)
        return focus_attention_packed(q, k, k, attn.heads, self.spec(attn), idx)


def _attend_packed_kv(q, kv, _v, heads: int, scale):
    """A ``PackedAttend`` on q [B, Lq, M*D] and the folded packed kv [B, Lk, M*2*D]."""
    b, lk, _ = kv.shape
    scale = (q.shape[-1] // heads) ** -0.5 if scale is None else scale
    return packed_attention(q, kv.reshape(b, lk, heads, 2, -1), heads, scale)


class PackedKVCrossAttn:
    """diffusers' ``AttnProcessor2_0`` for cross-attention on tokens, as one fused node: the query,
    one key-value projection of the encoder states, and their padding mask (diffusers passes it as
    the additive bias [B, 1, Lk] of 0 and -10000, which the node's mask reproduces)."""

    fused = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.group_norm is not None:
            raise ValueError("PackedKVCrossAttn takes token cross-attention only (AudioLDM2's attn2)")
        residual = hidden_states
        b, lk, _ = encoder_hidden_states.shape
        q = attn.to_q(hidden_states)  # [B, N, H*D]
        kv = F.linear(encoder_hidden_states, _interleaved(attn.heads, attn.to_k, attn.to_v))
        mask = None
        if attention_mask is not None:  # additive [B, 1, Lk] -> keep [B, Lk]
            mask = (attention_mask.reshape(b, lk) > MASK_FILTER / 2).to(torch.int32)
        out = packed_attention(q, kv.reshape(b, lk, attn.heads, 2, -1), attn.heads, attn.scale, mask)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def packed_attention_processors(*models: torch.nn.Module):
    """Inside: every packable attention of ``models`` (``packable``) attends packed (see the module
    docstring); the original processors are put back after."""
    saved = []
    try:
        for model in models:
            for name, module in model.named_modules():
                if not isinstance(module, Attention) or not packable(module):
                    continue
                old = module.processor
                if module.is_cross_attention:
                    new = PackedKVCrossAttn()
                elif isinstance(old, LiteFocusAttnProcessor):
                    new = PackedKVLiteFocus(old)
                else:
                    new = PackedQKVSelfAttn(name)
                saved.append((module, old))
                module.set_processor(new)
        yield len(saved)
    finally:
        for module, old in reversed(saved):
            module.set_processor(old)
