"""Synchronous vs asynchronous checkpoint saves of one rank with optimizer state, and the load.

    PYTHONPATH=. python bench/async_save_bench.py                       # GPU: llama-7b-8l, ZeRO-1, DP 1
    PYTHONPATH=. python bench/async_save_bench.py --preset tiny --seq-len 64 --mbs 2   # CPU smoke run
    PYTHONPATH=. python bench/async_save_bench.py --preset tiny-1b-gpu --layers 2 --seq-len 64 --mbs 1  # CPU, 3.5 GB

One process builds the product engine (pipelines.engine.TrainEngine; bf16 + fp32 masters + AdamW
moments on GPU, ZeRO-1 at DP 1) on synthetic tokens and, in this order (one checkpoint on disk at a
time: two 7B-8l checkpoints with optimizer state need ~50 GB):

1. ``crc``: zlib CRC-32 of 1 GiB in memory (GB/s; the integrity table's cost per byte).
2. ``sync``: ``megatron_llama.checkpoint.save`` as training runs it, timed in its parts: DeepSpeed
   writing the shards (``write_s``; torch.save, no fsync: the data may still be in the page cache),
   the CRC table (``crc_s``, re-reading the files), the commit; then ``fsync_s``, what it takes to
   make the files durable afterwards. The training stall of a sync save is ``save_s``.
3. ``async_first`` / ``async_zip_crc`` / ``async_reused``: ``train.async_save``'s saver
   (megatron_llama/checkpoint/async_save.py) three times: the first allocates and page-locks the
   host buffers, the next ones reuse them; ``async_zip_crc`` has torch.save compute its zip's
   per-record CRCs as the writer did before ``integrity.without_zip_crc``.
   ``stall_s`` is the training loop's wait for the copy to host memory; training steps run while the
   writer writes (``steps_during_write``, their extra time over the median step ``slowdown_s``), then
   the commit at a step boundary (``commit_s``); ``write_s`` / ``write_gb_s`` the background write
   including fsync and CRC; ``stall_fraction`` = (stall + commit + slowdown) / sync ``save_s``.
4. ``load``: the page cache for the async checkpoint evicted (posix_fadvise), then
   what ``checkpoint.resume`` does, timed: CRC verification (``verify_cold_s``; ranges hashed by
   ``crc32.THREADS`` threads) + DeepSpeed's load (``deepspeed_load_s``; memory-mapped on a GPU). The
   model and optimizer state after the load must equal those at the save (float64 sums of every
   tensor), and the next step's loss must equal the loss the run had at that step. ``load_before``
   then times the same with one hashing thread and torch's default load (the previous resume).

Writes ``bench/results/<device>-async-save.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9


def _env() -> None:
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29533")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def _config(args):
    from megatron_llama.config import DataConfig, ParallelConfig, RunConfig, TrainConfig, preset
    shape = {"num_layers": args.layers} if args.layers else {}
    return RunConfig(model=preset(args.preset, max_seq_len=max(args.seq_len, 2048), **shape),
                     parallel=ParallelConfig(tp=1, pp=1, dp=1, zero_stage=1),
                     train=TrainConfig(steps=1000, micro_batch_size=args.mbs, grad_accum_steps=1, warmup_steps=1,
                                       compile=False, save_dir=str(args.dir), keep_last=1, async_save=True),
                     data=DataConfig(seq_len=args.seq_len, synthetic=True))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fingerprint(engine) -> list[float]:
    """float64 sum and sum of squares over the module's parameters and every tensor of the optimizer's
    state_dict (fp32 masters, moments)."""
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)

    def add(obj):
        if torch.is_tensor(obj):
            if obj.is_floating_point():
                x = obj.detach().to(engine.device, torch.float64)
                total[0] += x.sum()
                total[1] += (x * x).sum()
        elif isinstance(obj, dict):
            for v in obj.values():
                add(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                add(v)
    for p in engine.engine.module.parameters():
        add(p)
    add(engine.optimizer.state_dict())
    return total.tolist()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _evict(path: Path) -> None:
    """Drop the files' pages from the page cache, so a load reads the disk."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _write(result: dict, out_path: Path) -> None:
    """After every phase (atomic), so a run cut off by a time limit still leaves what it measured."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out_path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-7b-8l")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--dir", type=Path, default=Path("/tmp/mllama-async-save-bench"),
                   help="checkpoint directory on the local disk to measure (emptied first)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--product-only", action="store_true",
                   help="skip the comparisons with earlier versions (async_zip_crc, load_before): ~100 s less on a GPU")
    args = p.parse_args()
    _env()
    from megatron_llama.checkpoint import directory, integrity
    from megatron_llama.checkpoint.async_save import AsyncSaves
    from launch.lr_schedule import schedule_for
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed

    t_start = time.perf_counter()
    device, _ = init_distributed()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    short = next((k for k in ("h200", "h100", "a100") if k in name.lower()), "cpu" if device.type == "cpu" else "gpu")
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"{short}-async-save.json"
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    cfg = _config(args)
    layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    engine = TrainEngine(cfg, layout, topo, device, schedule_for(cfg.train))
    vocab = cfg.model.vocab_size

    def batch(step: int):
        g = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, vocab, (args.mbs, args.seq_len + 1), generator=g)
        return [(tokens[:, :-1], tokens[:, 1:])]

    step_no = [0]
    step_times: list[float] = []

    def train_step() -> float:
        step_no[0] += 1
        t0 = time.perf_counter()
        loss = engine.train_step(iter(batch(step_no[0]))).loss  # .item(): synchronises
        step_times.append(time.perf_counter() - t0)
        return loss

    result = {"device": name, "preset": args.preset, "layers": cfg.model.num_layers, "seq_len": args.seq_len, "micro_batch": args.mbs,
              "params": sum(p.numel() for p in engine.engine.module.parameters()), "dtype": str(engine.dtype),
              "zero_stage": 1, "dp": 1, "dir": str(args.dir), "disk_free_gb": shutil.disk_usage(args.dir).free / GB,
              "host_mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30}
    for _ in range(3):
        train_step()
    step_times.clear()
    for _ in range(3):
        train_step()
    median_step = statistics.median(step_times)
    result["step_s"] = median_step
    result["setup_s"] = time.perf_counter() - t_start
    print(f"engine ready in {result['setup_s']:.0f} s, step {median_step:.3f} s", flush=True)
    _write(result, out_path)

    data = os.urandom(1 << 30)
    t0 = time.perf_counter()
    zlib.crc32(data)
    result["crc"] = {"bytes": len(data), "s": time.perf_counter() - t0}
    result["crc"]["gb_s"] = len(data) / GB / result["crc"]["s"]
    del data

    # --- synchronous save, as the trainer does it (directory.save), in its parts ---------------------
    step = step_no[0]
    root, tag = directory.begin_save(str(args.dir), step)
    tmp = root / (tag + directory.TMP_SUFFIX)
    t0 = time.perf_counter()
    engine.save(str(args.dir), tag + directory.TMP_SUFFIX, directory.client_state(step, 0))
    t1 = time.perf_counter()
    files = integrity.manifest(tmp)
    t2 = time.perf_counter()
    meta = directory.run_meta(cfg, layout, step, 0, 0.0, "bench", None)
    final = directory.finish_save(root, step, meta, files, keep_last=1)
    t3 = time.perf_counter()
    size = _dir_bytes(final)
    _evict(final)  # fsync + drop: what durability costs on top
    t4 = time.perf_counter()
    result["checkpoint_bytes"] = size
    result["sync"] = {"save_s": t3 - t0, "write_s": t1 - t0, "crc_s": t2 - t1, "commit_s": t3 - t2,
                      "fsync_s": t4 - t3, "write_gb_s": size / GB / (t1 - t0), "crc_gb_s": size / GB / (t2 - t1),
                      "durable_gb_s": size / GB / (t4 - t0 - (t2 - t1))}
    print(f"sync save {size / GB:.1f} GB: {t3 - t0:.1f} s (write {t1 - t0:.1f}, crc {t2 - t1:.1f}), "
          f"fsync after {t4 - t3:.1f} s", flush=True)
    shutil.rmtree(final)
    _write(result, out_path)

    # --- asynchronous saves ----------------------------------------------------------------------------
    rss0 = _rss_gib()
    saver = AsyncSaves(engine, str(args.dir), keep_last=1, device=device)
    product_without_zip_crc = integrity.without_zip_crc
    for label in ("async_first",) + (() if args.product_only else ("async_zip_crc",)) + ("async_reused",):
        step = step_no[0]
        print_before = _fingerprint(engine) if label == "async_reused" else None
        step_times.clear()
        # async_zip_crc: buffers reused, but torch.save computes its zip CRCs as before this version
        integrity.without_zip_crc = contextlib.nullcontext if label == "async_zip_crc" else product_without_zip_crc
        saver.save(cfg, layout, step, 0, 0.0, reason="bench")
        stall = saver.timing.stall_s
        losses_during = []
        committed = None
        commit_s = 0.0
        while committed is None:
            losses_during.append(train_step())
            t0 = time.perf_counter()
            committed = saver.poll()
            if committed is not None:
                commit_s = time.perf_counter() - t0
        t = saver.timing
        slow = sum(max(0.0, s - median_step) for s in step_times)
        rec = {"stall_s": stall, "commit_s": commit_s, "steps_during_write": len(step_times),
               "step_times_s": step_times[:], "slowdown_s": slow, "write_s": t.write_s,
               "write_phases_s": t.write_phases_s, "bytes": t.bytes,
               "write_gb_s": t.bytes / GB / t.write_s, "host_buffer_bytes": t.host_bytes,
               "rss_gib_before": rss0, "rss_gib_after": _rss_gib(),
               "stall_fraction": (stall + commit_s + slow) / result["sync"]["save_s"]}
        result[label] = rec
        _write(result, out_path)
        print(f"{label}: stall {stall:.2f} s, write {t.write_s:.1f} s ({rec['write_gb_s']:.2f} GB/s) while "
              f"{len(step_times)} steps ran (+{slow:.2f} s), commit {commit_s:.2f} s; "
              f"{rec['stall_fraction'] * 100:.1f} % of the sync save", flush=True)
        if label != "async_reused":
            shutil.rmtree(committed)  # one checkpoint on disk at a time
        else:
            saved_fp, next_loss, ckpt = print_before, losses_during[0], committed
    saver.close()

    # --- load the async checkpoint from disk, as checkpoint.resume does it, in its two parts ---------------
    from megatron_llama.checkpoint import crc32
    info = directory.latest(str(args.dir))
    size = _dir_bytes(ckpt)

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from megatron_llama.checkpoint.mapped_load import MappedLoad
    in_torch_load = [0.0]

    def timing(load):  # time spent inside the checkpoint engines' load (torch.load) during DeepSpeed's load
        def timed(self, *a, **k):
            t = time.perf_counter()
            try:
                return load(self, *a, **k)
            finally:
                in_torch_load[0] += time.perf_counter() - t
        return timed
    TorchCheckpointEngine.load, MappedLoad.load = timing(TorchCheckpointEngine.load), timing(MappedLoad.load)

    def timed_load(threads: int, mapped: tuple) -> dict:
        _evict(ckpt)
        in_torch_load[0] = 0.0
        crc32.THREADS, TrainEngine.mapped_load_devices = threads, mapped
        t0 = time.perf_counter()
        problem = integrity.verify(ckpt, info["files"])  # cold: reads every byte from the disk
        t1 = time.perf_counter()
        resumed, _ = directory._load(engine, layout, str(args.dir), info, {})  # DeepSpeed's load (page cache now)
        t2 = time.perf_counter()
        return {"crc_threads": threads, "mapped": device.type in mapped, "verify_cold_s": t1 - t0,
                "deepspeed_load_s": t2 - t1, "of_which_torch_load_s": in_torch_load[0], "load_s": t2 - t0, "load_gb_s": size / GB / (t2 - t0),
                "verify_problem": problem, "resumed_step": resumed}

    threads, mapped = crc32.THREADS, TrainEngine.mapped_load_devices
    result["load"] = timed_load(threads, mapped)  # the product's resume
    loaded_fp = _fingerprint(engine)
    step_no[0] = result["load"]["resumed_step"]
    replay = train_step()
    result["load"].update({"state_equal": loaded_fp == saved_fp, "fingerprint_saved": saved_fp,
                           "fingerprint_loaded": loaded_fp, "next_loss_during_write": next_loss,
                           "next_loss_after_resume": replay, "loss_equal": replay == next_loss})
    load = result["load"]
    print(f"load {size / GB:.1f} GB: {load['load_s']:.1f} s ({load['load_gb_s']:.2f} GB/s; cold verify "
          f"{load['verify_cold_s']:.1f} s with {threads} threads, DeepSpeed {load['deepspeed_load_s']:.1f} s, mapped "
          f"{load['mapped']}); state equal {loaded_fp == saved_fp}, next loss {replay} vs {next_loss}", flush=True)
    if not args.product_only:
        before = timed_load(1, ())  # the previous resume, after the state check: one thread hashing, torch's default load
        print(f"load, one CRC thread + default torch.load: {before['load_s']:.1f} s ({before['load_gb_s']:.2f} GB/s; "
              f"verify {before['verify_cold_s']:.1f} s, DeepSpeed {before['deepspeed_load_s']:.1f} s)", flush=True)
        result["load_before"] = before
        _write(result, out_path)
    crc32.THREADS, TrainEngine.mapped_load_devices = threads, mapped
    shutil.rmtree(args.dir, ignore_errors=True)
    result["total_s"] = time.perf_counter() - t_start
    steady = result["async_reused"]
    result["targets"] = {"stall_le_10pct_of_sync": steady["stall_fraction"] <= 0.10,
                         "write_ge_1_gb_s": steady["write_gb_s"] >= 1.0,
                         "load_ge_1_gb_s": result["load"]["load_gb_s"] >= 1.0}
    _write(result, out_path)
    print(json.dumps({k: result[k] for k in ("sync", "crc")}, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
