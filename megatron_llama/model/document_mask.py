"""Document masking for packed sequences: a token attends only to earlier tokens of its own sample.

SFT packs several conversations into one ``seq_len`` row. Exact masking: the causal mask is
intersected with "same segment", a block-diagonal of causal blocks, and passed to SDPA as a
boolean ``attn_mask`` (``is_causal`` cannot express it). Nothing leaks between samples, and
RoPE needs no position reset: attention scores under RoPE depend only on the distance
``i - j`` between two tokens of the same sample, which packing does not change; a test checks
that a sample's logits inside a pack equal its logits alone.

Cost: one ``[b, 1, s, s]`` bool mask per block call (negligible next to attention itself).
On GPU a masked SDPA runs the memory-efficient kernel instead of flash; the s*s mask is
never materialised as scores beyond what that kernel does.

``segments`` [b, s] int: sample number of each position; padding at the end of a row gets a
segment of its own, so every row of the mask keeps its diagonal (no all-masked row, no NaN).
"""
from __future__ import annotations

import torch


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [b, s] -> bool [b, 1, s, s]; True where query i may attend to key j
    (j <= i and both in the same segment)."""
    s = segments.shape[-1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril_()
    return (same & causal)[:, None]
