"""How every weight is laid out and split across tensor-parallel ranks: the one place that says so.

Each parameter of our model carries two attributes set where it is created:
``param.tp_split`` (one of the kinds below) and ``param.full_shape`` (its shape at TP = 1).
Initialisation, checkpoint conversion and resharding all go through :func:`shard` and
:func:`unshard`, so the model, the initialiser and the converters agree by construction.

Full (TP = 1) layouts, with ``g = num_kv_heads``, ``q = num_heads // g`` query heads per group,
``h = head_dim``, ``d = hidden``, ``f = ffn_hidden``, ``V = padded vocab``:

====================  =====================  ===================================================
parameter             full shape             layout / TP split
====================  =====================  ===================================================
embedding.weight      [V, d]                 rows = token ids; ``vocab``: contiguous row blocks
attention.qkv.weight  [g*(q+2)*h, d]         per KV group: its q query heads, then k, then v;
                                             ``rows``: contiguous blocks = whole groups per rank
attention.qkv.bias    [g*(q+2)*h]            same as the weight's rows
attention.proj.weight [d, d]                 input columns ordered head-major; ``cols``
mlp.gate_up.weight    [2f, d]                gate rows then up rows; ``gate_up``: each rank
                                             takes its slice of gate and of up, concatenated
mlp.down.weight       [d, f]                 ``cols``
*norm*.weight         [d]                    ``replicated``
head.weight           [V, d]                 ``vocab``
====================  =====================  ===================================================

Grouping QKV per KV group (not [all q | all k | all v]) is what lets each TP rank hold whole
query groups with a contiguous split; it costs nothing at run time.
"""
from __future__ import annotations

import torch

SPLITS = ("replicated", "rows", "cols", "gate_up", "vocab")


# megatron-core's attribute for "this tensor is split over TP", and the dim it is split on.
# megatron-core sets it only inside its own initialisation (perform_initialization=False here),
# so we set it: DeepSpeed's gradient-norm (clipping) counts a parameter on every TP rank only when
# it is marked, and replicated ones (norms) on TP rank 0 only.
_PARTITION_DIM = {"rows": 0, "vocab": 0, "gate_up": 0, "cols": 1}


def mark(param: torch.nn.Parameter, split: str, full_shape: tuple[int, ...]) -> torch.nn.Parameter:
    assert split in SPLITS, split
    param.tp_split = split
    param.full_shape = tuple(full_shape)
    param.tensor_model_parallel = split != "replicated"
    param.partition_dim = _PARTITION_DIM.get(split, -1)
    param.partition_stride = 1
    return param


def shard(full: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    """The slice of a full (TP = 1) tensor that TP rank ``rank`` of ``size`` holds."""
    if split == "replicated" or size == 1:
        return full
    if split in ("rows", "vocab"):
        return full.chunk(size, dim=0)[rank]
    if split == "cols":
        return full.chunk(size, dim=1)[rank]
    if split == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    raise ValueError(split)


def unshard(shards: list[torch.Tensor], split: str) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from all TP ranks' slices, in rank order."""
    if split == "replicated" or len(shards) == 1:
        return shards[0]
    if split in ("rows", "vocab"):
        return torch.cat(shards, dim=0)
    if split == "cols":
        return torch.cat(shards, dim=1)
    if split == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(split)


def qkv_group_order(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Row permutation taking ``[all q | all k | all v]`` (Hugging Face) rows to our grouped rows.

    ``grouped = separate[perm]`` where ``separate = cat([q_w, k_w, v_w])``.
    """
    q_per_group = num_heads // num_kv_heads
    q_rows = num_heads * head_dim
    kv_rows = num_kv_heads * head_dim
    order = []
    for g in range(num_kv_heads):
        q0 = g * q_per_group * head_dim
        order.extend(range(q0, q0 + q_per_group * head_dim))
        k0 = q_rows + g * head_dim
        order.extend(range(k0, k0 + head_dim))
        v0 = q_rows + kv_rows + g * head_dim
        order.extend(range(v0, v0 + head_dim))
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def load_full_state(module: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                    prefix: str = "") -> None:
    """Copy this TP rank's slice of each full (TP = 1) tensor into ``module``'s parameters.

    ``full`` maps global parameter names (``layers.3.mlp.down.weight``) to full tensors;
    ``prefix`` is the global name of ``module`` ("" for a whole LlamaModel).
    """
    for name, param in module.named_parameters():
        key = f"{prefix}.{name}" if prefix else name
        if key not in full:
            raise KeyError(f"checkpoint has no tensor {key}")
        src = full[key]
        if tuple(src.shape) != param.full_shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(src.shape)} != model shape {param.full_shape}")
        param.copy_(shard(src.to(param.dtype), param.tp_split, tp_rank, tp_size))
