"""DPO's reference log-probs: loaded from the stored pass, or computed once before the first step.

The reference model is the policy's starting point (``train.init_from``), so at step 0 the engine
itself is the reference: one forward-only pass over every pair of each split (training and
held-out) with the objective recording instead of computing a loss (pipelines/dpo_objective.py),
in the run's own layout. Rows are split over DP ranks disjointly (padding rows carry
``pair_index = -1`` and are not recorded); under PP only the last stage holds the log-probs, and
TP ranks hold the same values, so one all-reduce of the [total_pairs, 2] table over the world,
divided by the number of ranks that recorded each pair (``tp``), gives every rank the whole table.

The result is stored beside the dataset (megatron_llama/data/reference_logps.py), keyed by the
checksums of the reference weights and of the data, and read back by later runs and by resumes; a
resumed run never recomputes it (its weights are no longer the reference): a missing file there is
an error.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_llama.config import ConfigError, RunConfig
from megatron_llama.data import reference_logps as store


def _on_rank0(fn: Callable, device) -> object:
    """``fn()`` on global rank 0 (hashing files once), broadcast to every rank; a ConfigError on rank 0
    is raised on every rank."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ConfigError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def _micro_batch(ds, rows: list[int]) -> tuple[torch.Tensor, ...]:
    """Pairs ``rows`` of ``ds`` in the pair contract; rows past the end are padding (pair 0, index -1)."""
    items = [ds[r if r < len(ds) else 0] for r in rows]
    tokens, labels, mask = (torch.from_numpy(np.concatenate([x[j][0:1] for x in items] + [x[j][1:2] for x in items]))
                            for j in range(3))
    margin = torch.zeros(len(rows), dtype=torch.float32)
    index = torch.tensor([x[4] if r < len(ds) else -1 for x, r in zip(items, rows)], dtype=torch.int64)
    return tokens, labels, mask, margin, index


def compute(engine, ds, layout, cfg: RunConfig, say: Callable[[str], None]) -> np.ndarray:
    """The engine's log-probs of every pair of ``ds``: [total_pairs, 2] float64, NaN outside ``ds``."""
    t = cfg.train
    p, gas, dp = t.micro_batch_size, t.grad_accum_steps, layout.dp
    per_batch = p * gas * dp
    batches = -(-len(ds) // per_batch)
    logps = torch.zeros(ds.total_pairs, 2, dtype=torch.float64, device=engine.device)
    hits = torch.zeros(ds.total_pairs, dtype=torch.float64, device=engine.device)
    t0, shown = time.perf_counter(), 0.0
    with engine.objective.recording(logps, hits):
        for b in range(batches):
            base = b * per_batch
            micro = [_micro_batch(ds, [base + (m * dp + layout.dp_rank) * p + j for j in range(p)]) for m in range(gas)]
            engine.eval_step(micro)
            now = time.perf_counter()
            if now - shown > 10 or b + 1 == batches:  # a progress line every 10 s
                shown = now
                say(f"  reference pass: {min((b + 1) * per_batch, len(ds)):,}/{len(ds):,} pairs "
                    f"({now - t0:.1f} s)")
    dist.all_reduce(logps)
    dist.all_reduce(hits)
    want = torch.zeros_like(hits)
    want[torch.from_numpy(ds.pair_index).to(hits.device)] = layout.tp
    if not torch.equal(hits, want):  # every pair recorded by exactly the tp ranks of one last stage
        raise RuntimeError(f"reference pass: pairs recorded {hits.tolist()} times, expected {want.tolist()}")
    table = torch.full_like(logps, float("nan"))
    seen = hits > 0
    table[seen] = logps[seen] / hits[seen].unsqueeze(1)
    return table.cpu().numpy()


def prepare(engine, cfg: RunConfig, layout, splits: dict, start_step: int, say: Callable[[str], None]) -> None:
    """Give ``engine.objective`` the reference table of every split in ``splits`` ({name: dataset or
    None}): read from its stored file, or computed now (step 0 only) and stored."""
    from megatron_llama.checkpoint.fingerprint import weights_checksum
    spec = cfg.train.init_from
    model_sha = _on_rank0(lambda: weights_checksum(spec), engine.device)
    for split, ds in splits.items():
        if ds is None:
            continue
        key = _on_rank0(lambda: store.make_key(model_sha, ds), engine.device)
        path = _path(cfg, ds, split, key)
        if path.is_file():
            table = _on_rank0(lambda: store.load(path, key, "the stored DPO reference pass"), engine.device)
            say(f"  DPO reference ({split}): {path} (reference {spec}, {len(ds):,} pairs)")
        elif start_step:
            raise ConfigError(f"the DPO reference pass {path} is missing, and this run resumes at step "
                              f"{start_step}, whose weights are no longer the reference: restore the file, or "
                              "start a new run (new train.save_dir) from train.init_from")
        else:
            t0 = time.perf_counter()
            table = compute(engine, ds, layout, cfg, say)
            if dist.get_rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                store.save(path, key, table)
            dist.barrier()
            say(f"  DPO reference ({split}): computed {len(ds):,} pairs with {spec} in "
                f"{time.perf_counter() - t0:.1f} s -> {path}")
        engine.objective.tables[split] = torch.from_numpy(np.asarray(table, dtype=np.float64))


def _path(cfg: RunConfig, ds, split: str, key: dict) -> Path:
    path = store.default_path(ds, split, key)
    return Path(cfg.dpo.reference_dir) / path.name if cfg.dpo.reference_dir else path


def check_policy_source(cfg: RunConfig) -> None:
    """Before any weights are read: the policy (and reference) must be a language model, not a reward
    model (ConfigError). config/run.py has already refused a DPO run without ``train.init_from``."""
    from megatron_llama.checkpoint.fingerprint import check_language_model
    check_language_model(cfg.train.init_from)
