"""LiteFocus attention in its static, exportable form, and its float64 reference twin.

Token n of a [T, F] grid is ``n = t * F + f`` (time-major). Query n attends, in one softmax, to
    * the T keys of its own frequency bin f (same-frequency focusing), and
    * the S keys ``global_idx`` shared by every query (cross-frequency compensation): one sample
      [S] for the whole batch, or one per batch row [B, S] (requests batched together each keep
      their own sample).

Static form: fold F into the head axis so the whole layer is ONE dense attention over
[B, H*F, T + S, D] (reshape -> gather -> expand -> concat -> SDPA -> inverse reshape). No masks and
no data-dependent shapes, so it traces, exports to ONNX and hits the fused SDPA kernels. The fold
must be contiguous 4-D: a 5-D / strided input drops SDPA to its math path and loses the gain.

Packed form (``focus_attention_packed``): the same fold on the projections' own layout [B, N, H*D].
Token n = t * F + f, so [B, N, H*D] IS [B, T, F*H*D] with F*H heads of D: a reshape, no transpose.
Same-frequency keys are [B, T, F*H*D] the same way and the shared tokens [B, S, H*D] are repeated
over F, so the layer is one dense multi-head attention ``attend(q [B, T, M*D], k/v [B, T+S, M*D],
M = F*H)``. With ``attend`` a fused op (ONNX Runtime's MultiHeadAttention, see
``litefocus.export.fused``) no [T, T+S] score matrix is ever materialized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# attend(q [B, Lq, M*D], k [B, Lk, M*D], v [B, Lk, M*D], heads M, scale or None) -> [B, Lq, M*D]
PackedAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None"], torch.Tensor]


@dataclass(frozen=True)
class FocusSpec:
    """What one LiteFocus attention computes, apart from its tensors and its global sample.

    ``freq_bins``: F of the time-major [T, F] token grid; ``same_frequency``: each query also attends
    to the T keys of its own bin; ``scale``: the logits' scale (None: D ** -0.5); ``attend``: the dense
    multi-head attention the packed form runs (e.g. ``packed_sdpa``, or a fused op while exporting).
    ``litefocus_attention`` runs the grid form when ``attend`` is None, the packed form otherwise; the
    float64 reference ignores it.
    """

    freq_bins: int
    same_frequency: bool = True
    scale: float | None = None
    attend: PackedAttend | None = None


def is_tracing() -> bool:
    """True while torch.jit / ONNX / dynamo trace us: value checks (``.item()``) are skipped then."""
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def _check_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FocusSpec, global_idx: torch.Tensor | None
) -> torch.Tensor | None:
    """Validate the public arguments; return ``global_idx`` ([S] or [B, S]) on k's device, or None."""
    if not isinstance(spec, FocusSpec):
        raise ValueError(f"litefocus_attention: spec must be a FocusSpec, got {type(spec).__name__}")
    freq_bins = spec.freq_bins
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"litefocus_attention: {name} must be a 4-D tensor [B, H, N, D], got {shape}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"litefocus_attention: q, k, v must have the same shape [B, H, N, D] (self-attention), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"litefocus_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(freq_bins, bool) or not isinstance(freq_bins, int) or freq_bins < 1:
        raise ValueError(f"litefocus_attention: freq_bins must be a positive int, got {freq_bins!r}")
    n = q.shape[2]
    if n % freq_bins != 0:
        raise ValueError(
            f"litefocus_attention: N = {n} tokens is not a multiple of freq_bins = {freq_bins}; "
            "tokens must form a time-major [T, freq_bins] grid"
        )
    if global_idx is not None:
        ok = isinstance(global_idx, torch.Tensor) and (
            global_idx.dim() == 1 or (global_idx.dim() == 2 and global_idx.shape[0] == q.shape[0])
        )
        if not ok:
            got = (
                tuple(global_idx.shape) if isinstance(global_idx, torch.Tensor) else type(global_idx).__name__
            )
            raise ValueError(
                f"litefocus_attention: global_idx must be an int tensor [S] or [B = {q.shape[0]}, S], or None; "
                f"got {got}"
            )
        if global_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"litefocus_attention: global_idx must be int32 or int64, got {global_idx.dtype}"
            )
        if global_idx.numel() == 0:
            global_idx = None
        elif not is_tracing():
            lo, hi = int(global_idx.min()), int(global_idx.max())
            if lo < 0 or hi >= n:
                raise ValueError(
                    f"litefocus_attention: global_idx holds {lo if lo < 0 else hi}, outside [0, N = {n}); "
                    "indices address flattened tokens t * freq_bins + f"
                )
    if not spec.same_frequency and global_idx is None:
        raise ValueError(
            "litefocus_attention: same_frequency=False and no global_idx leaves a query nothing to attend "
            "to; pass global indices or keep same_frequency=True"
        )
    return None if global_idx is None else global_idx.to(k.device)


def focus_attention_grid(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FocusSpec, global_idx: torch.Tensor | None
) -> torch.Tensor:
    """The static computation, unchecked. Returns a [B, H, T, F, D] view (possibly strided).

    Callers pick their own final layout from it with a single copy. ``spec.attend`` is not used.
    """
    b, h, n, d = q.shape
    fb, scale = spec.freq_bins, spec.scale
    t = n // fb
    if not spec.same_frequency:
        # Every query shares the same S keys: plain attention, no fold needed.
        k_g, v_g = select_tokens(k, global_idx), select_tokens(v, global_idx)  # [B, H, S, D]
        out = F.scaled_dot_product_attention(q, k_g, v_g, scale=scale)  # [B, H, N, D]
        return out.view(b, h, t, fb, d)

    def fold(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, H*F, T, D], contiguous
        return x.reshape(b, h, t, fb, d).transpose(2, 3).reshape(b, h * fb, t, d)

    q_f, k_f, v_f = fold(q), fold(k), fold(v)
    if global_idx is not None:
        s = global_idx.shape[-1]

        def shared(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, H*F, S, D]
            x_g = select_tokens(x, global_idx)  # [B, H, S, D]
            return x_g.unsqueeze(2).expand(b, h, fb, s, d).reshape(b, h * fb, s, d)

        k_f = torch.cat([k_f, shared(k)], dim=2)  # [B, H*F, T+S, D]
        v_f = torch.cat([v_f, shared(v)], dim=2)
    out = F.scaled_dot_product_attention(q_f, k_f, v_f, scale=scale)  # [B, H*F, T, D]
    return out.view(b, h, fb, t, d).transpose(2, 3)  # [B, H, T, F, D] (strided view)


def packed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None
) -> torch.Tensor:
    """Dense multi-head attention in the packed layout: q [B, Lq, M*D], k, v [B, Lk, M*D] -> [B, Lq, M*D]."""
    b, lq, c = q.shape
    lk, d = k.shape[1], c // heads

    def split(x: torch.Tensor, length: int) -> torch.Tensor:  # [B, L, M*D] -> [B, M, L, D]
        return x.reshape(b, length, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q, lq), split(k, lk), split(v, lk), scale=scale)
    return out.transpose(1, 2).reshape(b, lq, c)


def focus_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    spec: FocusSpec,
    global_idx: torch.Tensor | None,
) -> torch.Tensor:
    """The static computation on the packed layout, unchecked: q, k, v [B, N, H*D] -> [B, N, H*D].

    Attends through ``spec.attend`` (``packed_sdpa`` when None). k and v may be wider than q (a packed
    key-value projection [B, N, H*2*D] passed as both, for an ``attend`` that takes it so): each is
    folded with its own width."""
    b, n, c = q.shape
    fb, scale = spec.freq_bins, spec.scale
    attend = packed_sdpa if spec.attend is None else spec.attend
    t = n // fb
    if not spec.same_frequency:  # every query shares the same S keys: H heads over them
        return attend(q, select_tokens(k, global_idx, 1), select_tokens(v, global_idx, 1), heads, scale)
    q_f, k_f, v_f = (x.reshape(b, t, fb * x.shape[-1]) for x in (q, k, v))  # [B, T, F*H*D]: F*H heads
    if global_idx is not None:
        s = global_idx.shape[-1]

        def shared(x: torch.Tensor) -> torch.Tensor:  # [B, N, H*D] -> [B, S, F*H*D]
            w = x.shape[-1]
            return select_tokens(x, global_idx, 1).unsqueeze(2).expand(b, s, fb, w).reshape(b, s, fb * w)

        k_f = torch.cat([k_f, shared(k)], dim=1)  # [B, T+S, F*H*D]
        v_f = torch.cat([v_f, shared(v)], dim=1)
    return attend(q_f, k_f, v_f, fb * heads, scale).reshape(b, n, c)  # [B, T, F*H*D] -> [B, N, H*D]


def select_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Tokens ``idx`` along axis ``dim`` of x (batch first: [B, H, N, D] with dim 2, or the packed
    [B, N, C] with dim 1); idx: [S] (every row) or [B, S] (per row). The token axis becomes S."""
    if idx.dim() == 1:
        return x.index_select(dim, idx)
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    index = idx.reshape(shape).expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1 :])
    return x.gather(dim, index.to(torch.int64))


def litefocus_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FocusSpec, global_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """LiteFocus attention, static form.

    q, k, v: [B, H, N, D] with token n = t * spec.freq_bins + f; global_idx: int tensor [S] (shared
    by the batch) or [B, S] (one sample per row), or None (None or empty: no cross-frequency part).
    Returns [B, H, N, D]: one softmax over concat(same-frequency keys, keys[global_idx]); a key in
    both sets counts twice. With ``spec.attend`` set it is computed in the packed form through that
    dense multi-head attention; otherwise in the grid form.
    """
    global_idx = _check_args(q, k, v, spec, global_idx)
    b, h, n, d = q.shape
    if spec.attend is not None:

        def pack(x: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, N, H*D]
            return x.transpose(1, 2).reshape(b, n, h * d)

        out = focus_attention_packed(pack(q), pack(k), pack(v), h, spec, global_idx)
        return out.view(b, n, h, d).transpose(1, 2)
    return focus_attention_grid(q, k, v, spec, global_idx).reshape(b, h, n, d)


def reference_litefocus_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FocusSpec, global_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Slow, obviously-correct twin: explicit float64 logits over each query's focus set.

    Same-frequency keys come from the full N x N logits with every other bin masked to -inf; the
    shared keys are appended as extra columns; one softmax over the concatenation. O(N^2) memory:
    for tests only. ``spec.attend`` is not used (this is the twin of both forms).
    """
    global_idx = _check_args(q, k, v, spec, global_idx)
    if global_idx is not None and global_idx.dim() == 2:  # one sample per row: row by row
        return torch.cat(
            [
                reference_litefocus_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], spec, idx)
                for i, idx in enumerate(global_idx)
            ]
        )
    n, d = q.shape[2], q.shape[3]
    freq_bins, same_frequency = spec.freq_bins, spec.same_frequency
    scale = d**-0.5 if spec.scale is None else spec.scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    logits = (q64 @ k64.transpose(-1, -2)) * scale  # [B, H, N, N]
    parts_logits, parts_values = [], []
    if same_frequency:
        f = torch.arange(n, device=q.device) % freq_bins
        same_bin = f[:, None] == f[None, :]  # [N, N]
        parts_logits.append(logits.masked_fill(~same_bin, float("-inf")))
        parts_values.append(v64)
    if global_idx is not None:
        parts_logits.append(logits[..., global_idx])  # [B, H, N, S]
        parts_values.append(v64[:, :, global_idx])  # [B, H, S, D]
    weights = torch.softmax(torch.cat(parts_logits, dim=-1), dim=-1)
    return (weights @ torch.cat(parts_values, dim=2)).to(q.dtype)
