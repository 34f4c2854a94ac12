"""Tied input/output embeddings across pipeline stages.

With ``model.tie_embeddings`` and PP > 1 the token embedding (first stage) and the LM head
(last stage) share one weight but live on different ranks. Each end keeps its own copy of this
TP rank's slice ``[V_padded/tp, d]``:

* first stage: ``embedding.word_embeddings.weight`` (PipelineModule name ``0.word_embeddings.weight``),
  the weight itself;
* last stage: the head's ``output.weight`` (``{L+2}.output.weight``), a copy marked
  ``tied_to = "embedding.word_embeddings.weight"``; it is initialised from that global name
  (``model/init.py``), so both ends start bitwise equal.

Every step the copies' gradients are summed before DeepSpeed's data-parallel reduction (its
``ReduceTiedGrads`` instruction, replaced by :func:`reduce_tied_grads`; on the fp32 gradients
under bf16), so both ends apply the same update; the head's copy is marked
``ds_pipe_replicated`` so the clipping norm counts the weight once.

The group is not Megatron's embedding group (first and last stage of one TP and DP rank) but
the first and last stage ranks of one TP rank over *all* DP ranks, and each gradient is divided
by DP first. Why: the DP reduction that follows sums DP contributions in an order that depends
on the weight's offset in ZeRO's flat buckets, which differs between the two stages; with
DeepSpeed's pair-wise tied reduction the copies drifted apart in the last bit after one step at
DP = 4 (measured on gloo). Summed over all 2*DP holders at once, every holder gets the same
value S/DP, and the DP mean that follows averages identical numbers, so the result is the same
on both ends, bitwise, whatever DP. Cost: the weight's gradient is all-reduced over 2*DP ranks
instead of 2 each step.

Checkpoints hold both copies (one in each end's layer file, equal); converters read the one the
parameter table names (``megatron_llama/checkpoint/params.py``: ``ParamInfo.pipe_copy``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

TIED_WEIGHT = "embedding.word_embeddings.weight"  # global name of the one shared weight
HEAD_COPY = "output.weight"                       # the copy's name inside the LM head layer


def mark_head_copy(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """The LM head's weight is a copy of the embedding's: initialised from its global name."""
    param.tied_to = TIED_WEIGHT
    return param


def tied_comms(topology, rank: int, first_layer, last_layer) -> dict:
    """DeepSpeed ``tied_comms`` for the tied embedding: ``{}`` on middle stages, else
    ``{"embedding": {ranks, group, weight_attr, module}}``. Every rank must call it (it creates
    one process group per TP rank, in the same order everywhere).

    ``first_layer`` / ``last_layer``: this rank's embedding / LM head layer when it holds the
    first / last stage (None otherwise).
    """
    last_stage = topology.get_dim("pipe") - 1
    mine = {}
    for tp_rank in range(topology.get_dim("model")):
        ranks = sorted(topology.filter_match(pipe=0, model=tp_rank)
                       + topology.filter_match(pipe=last_stage, model=tp_rank))
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = {"ranks": ranks, "group": group}
    if not mine:
        return {}
    if first_layer is not None:
        module, attr = first_layer, "word_embeddings.weight"
    else:
        module, attr = last_layer, HEAD_COPY
        last_layer.output.weight.ds_pipe_replicated = True  # the gradient norm counts the first stage's
    return {"embedding": {**mine, "weight_attr": [attr], "module": module}}


def tied_weights_and_groups(comms: dict) -> list[tuple[torch.nn.Parameter, object]]:
    """``[(weight, group)]`` whose gradients are summed before the DP reduction."""
    out = []
    for comm in comms.values():
        for attr in comm["weight_attr"]:
            weight = comm["module"]
            for part in attr.split("."):
                weight = getattr(weight, part)
            out.append((weight, comm["group"]))
    return out


def reduce_tied_grads(engine) -> None:
    """The ``ReduceTiedGrads`` instruction of a PipelineEngine: DeepSpeed's, plus the division by
    DP that makes the 2*DP-rank sum an exact stand-in for the pair sum + DP mean (module doc)."""
    if engine.zero_optimization_partition_gradients():  # as DeepSpeed's (ZeRO-2; not allowed with PP here)
        engine.optimizer.overlapping_partition_gradients_reduce_epilogue()
    dp = engine.grid.get_data_parallel_world_size()
    for weight, group in engine.module.get_tied_weights_and_groups():
        grad = weight._hp_grad if engine.using_bf16_optimizer else weight.grad
        if dp > 1:
            grad.div_(dp)
        dist.all_reduce(grad, group=group)


def install_tied_grad_reduction(engine) -> None:
    """Make ``engine`` (a DeepSpeed PipelineEngine) run :func:`reduce_tied_grads` for ``ReduceTiedGrads``."""
    from deepspeed.runtime.pipe import schedule

    table = dict(engine._INSTRUCTION_MAP)
    if schedule.ReduceTiedGrads not in table:
        raise RuntimeError("this DeepSpeed's PipelineEngine has no ReduceTiedGrads instruction: "
                           "tied embeddings with PP > 1 need deepspeed 0.19.x")
    table[schedule.ReduceTiedGrads] = reduce_tied_grads
    engine._INSTRUCTION_MAP = table  # this engine only; DeepSpeed binds the entry as a method
