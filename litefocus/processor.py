"""The diffusers attention processor that runs LiteFocus on one self-attention module.

It follows diffusers' ``AttnProcessor2_0`` step for step (projections, optional norms, output
projection, residual, rescale) and swaps only the attention core for the static LiteFocus form.
Per-call state (the global sample) lives on the handle, never in ``cross_attention_kwargs``: the
AudioLDM2 UNet does not forward those to its transformer blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from litefocus.attention import focus_attention_grid

if TYPE_CHECKING:  # pragma: no cover
    from litefocus.installer import LiteFocusHandle


class LiteFocusAttnProcessor:
    """Processor for one patched self-attention module (layer ``layer`` of ``handle``)."""

    def __init__(self, handle: LiteFocusHandle, layer: int, name: str, freq_bins: int):
        self.handle = handle
        self.layer = layer
        self.name = name
        self.freq_bins = freq_bins

    def __repr__(self) -> str:
        return f"LiteFocusAttnProcessor(layer={self.layer}, name={self.name!r}, freq_bins={self.freq_bins})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                f"LiteFocus on {self.name}: got encoder_hidden_states, but LiteFocus only replaces "
                "self-attention; cross-attention modules must keep their own processor"
            )
        if attention_mask is not None:
            raise ValueError(
                f"LiteFocus on {self.name}: self-attention masks are not supported (AudioLDM2 passes none)"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        b, n, _ = hidden_states.shape  # x: [B, N, C], token n = t * F + f
        if n % self.freq_bins != 0:
            raise ValueError(
                f"LiteFocus on {self.name}: {n} tokens do not form a [T, {self.freq_bins}] grid; the UNet "
                "latent must have the frequency size LiteFocus was installed for"
            )
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        heads = attn.heads
        d = k.shape[-1] // heads
        q = q.view(b, n, heads, d).transpose(1, 2)  # q: [B, H, N, D]
        k = k.view(b, n, heads, d).transpose(1, 2)
        v = v.view(b, n, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        idx = self.handle.layer_indices(self.layer, n, k.device)  # [S], [B, S] or None
        same = self.handle.config.same_frequency
        out = focus_attention_grid(q, k, v, self.freq_bins, idx, same, attn.scale)  # [B, H, T, F, D]
        out = out.permute(0, 2, 3, 1, 4).reshape(b, n, heads * d).to(q.dtype)  # [B, N, H*D]

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
