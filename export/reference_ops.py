"""numpy twins of the ONNX Runtime contrib ops the exported graphs use, for ``onnx.reference``.

GroupNorm, SkipGroupNorm, NhwcConv and BiasSplitGelu run only on ONNX Runtime's CUDA EP, so a
GPU-form graph cannot run on a CPU through ONNX Runtime. ``reference_session(path)`` evaluates it
with ``onnx.reference.ReferenceEvaluator`` and these implementations instead (float64 inside, the
input's precision out), which is how the tests check the GPU form against PyTorch on a CPU. Each
twin is itself tested against the plain-op subgraph it replaces (``tests/export/test_contrib_twins.py``);
whole tiny graphs in the GPU form against PyTorch are in ``tests/export/test_gpu_form.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from litefocus.engine.contract import CONTRIB_DOMAIN

_erf = np.vectorize(math.erf, otypes=[np.float64])  # float64, element by element (tiny graphs)


def group_norm_nhwc(x, gamma, beta, groups: int, eps: float, silu: bool) -> np.ndarray:
    """x: [B, H, W, C] -> normalized per (batch, group) over H, W and the group's C / groups."""
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * gamma.astype(np.float64) + beta
    if silu:
        y = y / (1.0 + np.exp(-y))
    return y.astype(x.dtype)


class ContribTwin(OpRun):
    """Base of the contrib ops' numpy twins.

    ``OpRun.run`` hands ``_run`` every attribute the node carries as a keyword, and
    ``OpRun._load_attributes`` has already set each one on the instance. Contrib ops have no schema
    in ``onnx``, so an attribute the exporter did not write is simply absent (no default is filled
    in). A twin therefore names only its inputs, in ``compute``, and reads its attributes from the
    instance with ``attribute(name, the op's default)``: ``_run`` drops the keyword copies.
    """

    op_domain = CONTRIB_DOMAIN

    def _run(self, *inputs, **_attributes):  # the same values are on self: see ``attribute``
        return self.compute(*inputs)

    def compute(self, *inputs) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def attribute(self, name: str, default=None):
        """The node's attribute ``name`` (as ``onnx.reference`` loaded it), or ``default`` if absent."""
        value = getattr(self, name, None)
        return default if value is None else value


class GroupNorm(ContribTwin):
    def compute(self, x, gamma, beta):
        if self.attribute("channels_last") == 0:
            raise NotImplementedError("GroupNorm twin: only channels_last=1 (what the exporter writes)")
        eps = self.attribute("epsilon", 1e-5)  # the op's default
        silu = self.attribute("activation") == 1
        return (group_norm_nhwc(x, gamma, beta, self.attribute("groups"), eps, silu),)


class SkipGroupNorm(ContribTwin):
    """y = GroupNorm(x + skip + bias); the optional second output is that sum."""

    def compute(self, x, gamma, beta, skip, bias=None):
        s = x.astype(np.float64) + skip + (0.0 if bias is None else bias)
        eps = self.attribute("epsilon", 1e-5)  # the op's default
        silu = self.attribute("activation") == 1
        y = group_norm_nhwc(s, gamma, beta, self.attribute("groups"), eps, silu).astype(x.dtype)
        return (y, s.astype(x.dtype))


class NhwcConv(ContribTwin):
    """Conv on x: [B, H, W, C] with weight [M, kH, kW, C / group] -> [B, H', W', M]."""

    def compute(self, x, w, b=None):
        from onnx.reference.ops.op_conv import Conv

        nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float64)
        weight = np.ascontiguousarray(w.transpose(0, 3, 1, 2)).astype(np.float64)
        args = [nchw, weight] + ([] if b is None else [b.astype(np.float64)])
        y = Conv.eval(
            *args,
            auto_pad=self.attribute("auto_pad") or "NOTSET",
            dilations=self.attribute("dilations"),
            group=self.attribute("group") or 1,
            kernel_shape=self.attribute("kernel_shape"),
            pads=self.attribute("pads"),
            strides=self.attribute("strides"),
        )
        return (np.ascontiguousarray(y.transpose(0, 2, 3, 1)).astype(x.dtype),)


class BiasSplitGelu(ContribTwin):
    """x: [B, N, 2D], bias [2D] -> (x + bias)[..., :D] * gelu((x + bias)[..., D:]) (erf GELU)."""

    def compute(self, x, bias):
        s = x.astype(np.float64) + bias
        h, gate = np.split(s, 2, axis=-1)
        return ((h * 0.5 * gate * (1.0 + _erf(gate / np.sqrt(2.0)))).astype(x.dtype),)


class MultiHeadAttention(ContribTwin):
    """The forms the exporter writes: query [B, Lq, M*D] with key and value [B, Lk, M*D]; a packed
    QKV query [B, L, M, 3, D]; a query with a packed KV key [B, Lk, M, 2, D]; optionally a key padding
    mask [B, Lk] (0: the key gets ``mask_filter_value`` added). No bias, no past, no attention bias."""

    def compute(self, q, k=None, v=None, bias=None, key_padding_mask=None, *rest):
        if bias is not None or any(r is not None for r in rest):
            raise NotImplementedError("MultiHeadAttention twin: no bias, attention bias or past inputs")
        num_heads = self.attribute("num_heads")
        if q.ndim == 5:  # packed QKV [B, L, M, 3, D]
            q, k, v = (q[:, :, :, i] for i in range(3))
        else:
            q = q.reshape(*q.shape[:2], num_heads, -1)
            if k.ndim == 5:  # packed KV [B, Lk, M, 2, D]
                k, v = k[:, :, :, 0], k[:, :, :, 1]
            else:
                k, v = (x.reshape(*x.shape[:2], num_heads, -1) for x in (k, v))
        b, lq, m, d = q.shape

        def heads(x):  # [B, L, M, D] -> [B, M, L, D]
            return x.astype(np.float64).transpose(0, 2, 1, 3)

        scale = self.attribute("scale")
        s = heads(q) @ heads(k).transpose(0, 1, 3, 2) * (scale if scale else d**-0.5)
        if key_padding_mask is not None:
            fill = self.attribute("mask_filter_value", -10000.0)
            s = s + np.where(key_padding_mask == 0, fill, 0.0)[:, None, None, :]
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        out = (p / p.sum(axis=-1, keepdims=True)) @ heads(v)
        return (out.transpose(0, 2, 1, 3).reshape(b, lq, m * d).astype(q.dtype),)


class GatherElements(OpRun):
    """onnx.reference's own gathers through ``np.choose``, which takes fewer than 64 choices along the
    axis: the LiteFocus sample gathers from T tokens. Same op, through ``np.take_along_axis``."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        axis = axis or 0
        idx = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, idx.astype(np.int64), axis=axis),)


CONTRIB_TWINS = (GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, MultiHeadAttention)


def reference_session(model_or_path) -> ReferenceEvaluator:
    """``onnx.reference`` over a graph (path or ModelProto, weights next to it) with the contrib twins."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        model_or_path = onnx.load(str(model_or_path), load_external_data=True)
    return ReferenceEvaluator(model_or_path, new_ops=[*CONTRIB_TWINS, GatherElements])
