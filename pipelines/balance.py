"""Splitting ``[embedding, block x L, final norm, LM head]`` into pipeline stages.

Pure functions: a weight per layer in, stage boundaries out. Four ways to weigh layers:

``bloom``       embedding, every block and the head count 1 each (BLOOM-176B's
                ``type:transformer|embedding``); the final norm counts 0.
``uniform``     blocks count 1, everything else 0: the same number of blocks per stage.
``parameters``  parameters each TP rank holds for the layer.
``cost``        an estimate of the bytes the layer pins on its GPU during training
                (:func:`cost_weights`): weights, gradients and ZeRO-1-sharded optimizer states,
                plus the activations kept for backward for the micro-batches in flight.
                With a 250k vocabulary the embedding and, above all, the LM head (its fp32
                logits for the loss) weigh several blocks, so the first and last stages get
                fewer blocks; with 32k the split is close to uniform.

Whatever the weights, every stage gets at least one transformer block: a stage without one
(e.g. the embedding alone) hangs DeepSpeed with bf16 + ZeRO-1 (DeepSpeed issue 5384), and such a
stage would idle anyway.
"""
from __future__ import annotations

from megatron_llama.config import ModelConfig, ParallelConfig


def layer_kinds(num_layers: int) -> list[str]:
    return ["embedding"] + ["block"] * num_layers + ["final_norm", "head"]


def partition(weights: list[float], is_block: list[bool], num_stages: int) -> list[int]:
    """Contiguous split minimising the heaviest stage, each stage holding >= 1 block.

    Returns ``num_stages + 1`` boundaries (stage i = layers ``[b[i], b[i+1])``), DeepSpeed's
    ``parts`` convention. Exact dynamic programme, O(stages * layers^2); ties are broken towards
    the most even number of blocks per stage, then towards earlier boundaries.
    """
    n = len(weights)
    if len(is_block) != n:
        raise ValueError("weights and is_block differ in length")
    blocks = sum(is_block)
    if num_stages < 1 or num_stages > blocks:
        raise ValueError(f"cannot split {blocks} blocks into {num_stages} stages with >= 1 block each")
    prefix_w = [0.0]
    prefix_b = [0]
    for w, b in zip(weights, is_block):
        prefix_w.append(prefix_w[-1] + float(w))
        prefix_b.append(prefix_b[-1] + int(b))
    INF = (float("inf"), float("inf"))
    # best[k][j] = (max stage weight, sum of squared block counts) for layers [0, j) in k stages
    best = [[INF] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, num_stages + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == INF:
                    continue
                nb = prefix_b[j] - prefix_b[i]
                if nb == 0:
                    continue
                load = prefix_w[j] - prefix_w[i]
                cand = (max(best[k - 1][i][0], load), best[k - 1][i][1] + nb * nb)
                if _better(cand, best[k][j]):
                    best[k][j], cut[k][j] = cand, i
    if best[num_stages][n] == INF:
        raise ValueError("no valid partition")
    bounds = [n]
    j = n
    for k in range(num_stages, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


def _better(a: tuple, b: tuple) -> bool:
    # Compare max load with a relative tolerance so float noise does not decide ties.
    if a[0] < b[0] * (1 - 1e-9):
        return True
    if b[0] == float("inf") or a[0] > b[0] * (1 + 1e-9):
        return False
    return a[1] < b[1]


def bloom_weights(cfg: ModelConfig) -> list[float]:
    return [1.0] + [1.0] * cfg.num_layers + [0.0, 1.0]


def uniform_weights(cfg: ModelConfig) -> list[float]:
    return [0.0] + [1.0] * cfg.num_layers + [0.0, 0.0]


def parameter_weights(cfg: ModelConfig, tp: int = 1) -> list[float]:
    """Parameters per TP rank (norm weights are replicated, everything else split by tp). With
    tied embeddings the last stage still holds a copy of the weight (``tied.py``), so it counts."""
    d = cfg.hidden_size
    emb = cfg.padded_vocab_size(tp) * d / tp + (2 * d if cfg.embedding_layernorm else 0)
    block = (cfg.block_params() - 2 * d) / tp + 2 * d
    head = cfg.padded_vocab_size(tp) * d / tp
    return [emb] + [block] * cfg.num_layers + [float(d), head]


def cost_weights(cfg: ModelConfig, tp: int = 1, dp: int = 1, seq_len: int | None = None,
                 micro_batch_size: int = 1, in_flight: int = 1, checkpointing: str = "none",
                 bf16: bool = True) -> list[float]:
    """Bytes a layer pins on its device during training (per TP rank); the ``cost`` method.

    * weights and gradients: P * (w + 4) bytes (bf16 weights w=2 with fp32 gradient
      accumulation; fp32 w=4), optimizer: P * 12 / dp bytes (fp32 master, Adam m and v,
      sharded over DP by ZeRO-1);
    * activations kept for backward, per micro-batch, times ``in_flight`` micro-batches (the
      1F1B schedule keeps up to ``pp`` of them on the first stage: pass pp for a bound):
      - block (``none``): the inputs of the two norms and the matmul inputs/outputs:
        s*b*(4d + (d + 2*kv + d + 3f)/tp) elements, plus the attention output d/tp; SDPA's
        flash kernels keep no s x s matrix. ``selective`` keeps the matmul outputs only
        (s*b*(d + 2*kv + 2f)/tp + 2d); ``full`` only the block input s*b*d.
      - embedding: its output s*b*d; final norm: input and output 2*s*b*d;
      - LM head: the logits s*b*V/tp in the activation dtype plus their fp32 copy and the fp32
        softmax the vocab-parallel cross entropy keeps: s*b*V/tp*(w + 8) bytes.
    """
    s = seq_len or cfg.max_seq_len
    b = micro_batch_size
    w = 2 if bf16 else 4
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = cfg.num_kv_heads * cfg.head_dim
    v = cfg.padded_vocab_size(tp) / tp
    state = (w + 4) + 12 / dp
    params = parameter_weights(cfg, tp)
    if checkpointing == "full":
        block_act = s * b * d * w
    elif checkpointing == "selective":
        block_act = s * b * ((d + 2 * kv + 2 * f) / tp + 2 * d) * w
    else:
        block_act = s * b * (4 * d + (d + 2 * kv + d + 3 * f + d) / tp) * w
    acts = [s * b * d * w] + [block_act] * cfg.num_layers + [2 * s * b * d * w, s * b * v * (w + 8)]
    return [p * state + in_flight * a for p, a in zip(params, acts)]


def stage_boundaries(cfg: ModelConfig, parallel: ParallelConfig, dp: int = 1, seq_len: int | None = None,
                     micro_batch_size: int = 1, bf16: bool = True) -> list[int]:
    """Boundaries for ``parallel.partition_method`` (see the module docstring)."""
    method = parallel.partition_method
    if method == "bloom":
        weights = bloom_weights(cfg)
    elif method == "uniform":
        weights = uniform_weights(cfg)
    elif method == "parameters":
        weights = parameter_weights(cfg, parallel.tp)
    elif method == "cost":
        weights = cost_weights(cfg, parallel.tp, dp, seq_len, micro_batch_size, in_flight=parallel.pp,
                               checkpointing=parallel.activation_checkpointing, bf16=bf16)
    else:
        raise ValueError(method)
    is_block = [k == "block" for k in layer_kinds(cfg.num_layers)]
    return partition(weights, is_block, parallel.pp)


def blocks_per_stage(bounds: list[int], num_layers: int) -> list[int]:
    kinds = layer_kinds(num_layers)
    return [sum(k == "block" for k in kinds[a:b]) for a, b in zip(bounds, bounds[1:])]
