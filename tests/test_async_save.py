"""Asynchronous checkpoint saves (train.async_save, megatron_llama/checkpoint/async_save.py) against
synchronous ones: real DeepSpeed engines on 2 gloo ranks, fp32 CPU.

* PP2 run saving every 2 steps, sync vs async: every file of every checkpoint is the same bytes,
  run.json's CRC tables agree, and resuming from either gives bitwise the same losses. Neither
  save has torch.save compute its zip's per-record CRCs (run.json's table replaces them).
* DP2 ZeRO-1 engine saving three times: the host buffers are made once and reused (same
  addresses), a second save waits for the first, their size is what the start-up host-memory check
  estimates (launch/host_memory.py) and what the files hold.
"""
import json
import zipfile
from pathlib import Path

import pytest

from test_train_equivalence import base_overrides

STEPS = 6


def _train(rank, world, overrides, save_dir, max_steps):
    from launch.train import train
    from megatron_llama.config import load_config
    cfg = load_config(None, overrides + [f"train.save_dir={save_dir}"])
    return train(cfg, max_steps=max_steps, log=False, save=True).losses


def _files(ckpt: Path) -> dict:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_async_checkpoints_are_the_sync_bytes_and_resume_the_same(dist_pool, tmp_path):
    pool = dist_pool(2)
    common = base_overrides("tiny") + ["parallel.pp=2", "parallel.dp=1", "train.steps=8", "train.save_interval=2",
                                       "train.keep_last=0"]
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    first_sync = pool.run(_train, common, str(sync), STEPS)[0]
    first_async = pool.run(_train, common + ["train.async_save=true"], str(asyn), STEPS)[0]
    assert first_async == first_sync
    for step in (2, 4, 6):  # 2 and 4 written in the background, 6 (the last) before train() returned
        tag = f"step{step:07d}"
        a, b = _files(sync / tag), _files(asyn / tag)
        assert sorted(a) == sorted(b)
        meta_a, meta_b = json.loads(a.pop("run.json")), json.loads(b.pop("run.json"))
        assert meta_a["files"] == meta_b["files"] and set(meta_a["files"]) == set(a)
        assert any(name.startswith("layer_") for name in a) and any("optim_states" in name for name in a)
        for name in a:
            assert a[name] == b[name], f"{tag}/{name} differs between the sync and the async save"
            if name.endswith(".pt"):
                assert {i.CRC for i in zipfile.ZipFile(asyn / tag / name).infolist()} == {0}, name
    assert (asyn / "latest").read_text() == "step0000006" and not list(asyn.glob("*.tmp"))
    resumed_sync = pool.run(_train, common, str(sync), None)[0]
    resumed_async = pool.run(_train, common + ["train.async_save=true"], str(asyn), None)[0]
    assert len(resumed_async) == 2 and resumed_async == resumed_sync


def _buffers(rank, world, overrides, save_dir):
    import torch
    from launch.host_memory import shard_bytes_per_rank
    from launch.lr_schedule import schedule_for
    from megatron_llama.checkpoint.async_save import AsyncSaves
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed

    cfg = load_config(None, overrides + [f"train.save_dir={save_dir}"])
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    engine = TrainEngine(cfg, layout, topo, device, schedule_for(cfg.train))
    batch = [(torch.randint(0, 256, (1, 32)), torch.randint(0, 256, (1, 32))) for _ in range(2)]
    engine.train_step(iter(batch))
    saver = AsyncSaves(engine, save_dir, keep_last=0, device=device)
    addresses, allocations, committed = [], [], []
    for step in (1, 2, 3):
        saver.save(cfg, layout, step, step * 4, 1.0)
        assert saver.pending is not None and saver.pending.step == step
        addresses.append(sorted(b.data_ptr() for b in saver.buffers._buffers.values()))
        allocations.append(saver.buffers.allocations)
        engine.train_step(iter(batch))  # training changes the weights while the writer writes
        committed.append(sorted(p.name for p in Path(save_dir).iterdir() if p.name.startswith("step")))
    saver.wait()
    saver.close()
    phases = saver.timing.write_phases_s
    assert set(phases) == {"serialize", "fsync", "crc"} and min(phases.values()) > 0
    assert sum(phases.values()) <= saver.timing.write_s  # the split accounts for the write, nothing twice
    return (addresses, allocations, committed, saver.timing.host_bytes, saver.timing.bytes,
            shard_bytes_per_rank(cfg, layout.world_size, torch.float32))


@pytest.mark.distributed
def test_host_buffers_are_reused_and_a_second_save_waits_for_the_first(dist_pool, tmp_path):
    overrides = base_overrides("tiny", dp=2) + ["parallel.dp=2", "parallel.zero_stage=1"]
    out = dist_pool(2).run(_buffers, overrides, str(tmp_path / "run"))
    for addresses, allocations, committed, host_bytes, written, _ in out:
        assert addresses[0] == addresses[1] == addresses[2] and allocations[0] == allocations[2] > 0
        # save 2 began by committing save 1, save 3 by committing save 2
        assert committed[1][:1] == ["step0000001"] and committed[2][:2] == ["step0000001", "step0000002"]
        assert committed[2][-1] == "step0000003.tmp"
        assert abs(written - host_bytes) < 0.05 * host_bytes  # the files are the buffers plus zip headers
    # rank 0 also holds the module; the estimate is per rank on average: compare the machine's total
    held, estimate = sum(o[3] for o in out), sum(o[5] for o in out)
    assert abs(estimate - held) < 0.1 * held, (estimate, held)
    assert sorted(p.name for p in (tmp_path / "run").glob("step*")) == ["step0000001", "step0000002", "step0000003"]
    assert (tmp_path / "run" / "latest").read_text() == "step0000003"
