"""Activation checkpointing (none / selective / full) at TP 2 on real gloo groups.

Every mode must give the same gradients as ``none`` (and as Hugging Face), and each mode must
do what it says in the backward pass, counted with a dispatch mode around ``loss.backward()``:

* ``none``: nothing of the forward is re-run;
* ``selective`` (LLaMA paper 2.4): attention and the element-wise ops (norms, RoPE, SwiGLU)
  are recomputed, but no matrix product and no TP all-reduce is re-run;
* ``full``: the whole block forward is re-run, its matmuls and the TP all-reduce included.

Relative error = ``||ours - ref||_2 / ||ref||_2`` per parameter gradient (float64), bound 1e-5.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from test_model_parity import BATCH, CASES, SEQ, TOL, case_config, hf_reference, rel_err, run_ours

MODES = ("none", "selective", "full")


def _op_counter(counts: collections.Counter):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.name()] += 1
            return func(*args, **(kwargs or {}))

    return contextlib.contextmanager(lambda: (yield from _entered(Count())))


def _entered(mode):
    with mode:
        yield


def _modes_task(rank, world, case, seed):
    from megatron.core import parallel_state

    from megatron_llama.model.hf_mapping import hf_to_native, native_to_hf

    parallel_state.initialize_model_parallel(2, 1)
    cfg = case_config(case)
    hf = hf_reference(cfg, CASES[case][2], seed)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 2))
    hf(input_ids=tokens, labels=tokens).loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    full = hf_to_native(hf.state_dict(), cfg, 2)

    grads, counts, out = {}, {}, {"vs_none": {}, "vs_hf": {}, "counts": {}}
    for mode in MODES:
        counts[mode] = collections.Counter()
        res = run_ours(cfg, full, tokens, 2, checkpointing=mode, seed=seed, grads=True,
                       backward_context=_op_counter(counts[mode]))
        grads[mode] = res["grads"]
        ours_hf = native_to_hf(res["grads"], cfg)
        out["vs_hf"][mode] = max(rel_err(g, hf_grads[n]) for n, g in ours_hf.items())
        c = counts[mode]
        out["counts"][mode] = {
            "mm": c["aten::mm"],
            "allreduce": c["c10d::allreduce_"],
            "sdpa_forward": sum(v for k, v in c.items() if "scaled_dot_product" in k and "backward" not in k),
            "silu": c["aten::silu"],
            "rsqrt": c["aten::rsqrt"],
        }
    for mode in MODES[1:]:
        out["vs_none"][mode] = max(rel_err(grads[mode][n], g) for n, g in grads["none"].items())
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["gqa", "qkv-bias"])
def test_checkpointing_modes_same_gradients_tp2(dist_pool, case):
    results = dist_pool(2).run(_modes_task, case, 31)
    assert results[0] == results[1], "TP ranks disagree"
    r = results[0]
    L = case_config(case).num_layers
    for mode in MODES[1:]:
        print(f"[ckpt] {case} tp=2 {mode}: max grad rel err vs none {r['vs_none'][mode]:.2e}, "
              f"vs HF {r['vs_hf'][mode]:.2e}")
        assert r["vs_none"][mode] <= TOL, (mode, r["vs_none"])
    for mode in MODES:
        assert r["vs_hf"][mode] <= TOL, (mode, r["vs_hf"])
    print(f"[ckpt] {case} backward op counts: {r['counts']}")

    none, sel, full = (r["counts"][m] for m in MODES)
    # none: no forward op of a block runs again in backward
    assert none["sdpa_forward"] == none["silu"] == 0
    # selective: attention and SwiGLU recomputed once per block (and both RMSNorms)...
    assert sel["sdpa_forward"] == sel["silu"] == L and sel["rsqrt"] == 2 * L
    # ...but no matmul and no TP all-reduce is re-run
    assert sel["mm"] == none["mm"] and sel["allreduce"] == none["allreduce"]
    # full: the block forward again: qkv, proj, gate_up and down matmuls and the attention
    # all-reduce (torch stops a non-reentrant recompute once the last saved tensor is rebuilt,
    # the down matmul's input, so the final all-reduce of each block is not re-run)
    assert full["sdpa_forward"] == full["silu"] == L and full["rsqrt"] == 2 * L
    assert full["mm"] == none["mm"] + 4 * L
    assert full["allreduce"] >= none["allreduce"] + L
