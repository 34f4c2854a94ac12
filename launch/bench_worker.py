"""What every rank of one benchmark configuration runs (started by ``mllama-bench``).

``python -m launch.bench_worker SPEC_JSON OUT_JSON`` under a launcher (torchrun, deepspeed,
srun): real optimizer steps (forward, backward, ZeRO-1 AdamW) on synthetic tokens, warm-up
excluded. Every rank times every step; the step time of a configuration is the slowest
rank's, and rank 0 writes the aggregate to OUT_JSON.

SPEC: {"impl": "ours" or a peer of launch/bench_peers.py, "preset", "tp", "pp", "dp", "mbs", "gas",
       "checkpointing", "seq_len", "steps", "warmup", "compile", "precision", "fp8_recipe",
       "mem_cap_gib" (optional: cap the GPU memory, as on a smaller card)}
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist


def _run_config(spec: dict):
    from megatron_llama.config import DataConfig, ParallelConfig, RunConfig, TrainConfig

    from .bench_shapes import bench_model
    model = bench_model(spec["preset"], spec["seq_len"])
    return RunConfig(
        model=model,
        parallel=ParallelConfig(tp=spec["tp"], pp=spec["pp"], dp=spec["dp"],
                                activation_checkpointing=spec["checkpointing"], **spec.get("parallel", {})),
        train=TrainConfig(steps=spec["warmup"] + spec["steps"], micro_batch_size=spec["mbs"],
                          grad_accum_steps=spec["gas"], warmup_steps=1, compile=spec.get("compile"),
                          precision=spec.get("precision", "auto"), fp8_recipe=spec.get("fp8_recipe") or "tensorwise"),
        data=DataConfig(seq_len=spec["seq_len"], synthetic=True))


def _ours(spec: dict, device: torch.device):
    """A step function over the product's own engine (pipelines.engine.TrainEngine)."""
    from launch.batches import open_batches
    from launch.lr_schedule import schedule_for
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology

    cfg = _run_config(spec)
    layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    engine = TrainEngine(cfg, layout, topo, device, schedule_for(cfg.train))
    batches, _ = open_batches(cfg, 0, layout.dp_rank, layout.dp, rank_zero_first=lambda fn: fn())

    def step() -> float:
        return engine.train_step(next(batches) for _ in range(cfg.train.grad_accum_steps)).loss
    step.engine = engine  # bench/profile_step.py sets the trainer's spike gate on it
    step.batches = batches  # and steps by hand for its memory breakdown
    return step


def run(spec: dict) -> dict:
    """Time one configuration on the current distributed world; every rank returns the aggregate."""
    from megatron_llama.flops import mfu, model_tflops_per_gpu, peak_tflops

    from .bench_shapes import bench_model
    from pipelines.topology import init_distributed

    device, _ = init_distributed()
    if spec.get("mem_cap_gib") and device.type == "cuda":  # the allocator refuses beyond the cap: OOM as on a smaller card
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["mem_cap_gib"] * 2**30 / total), device)
    world = dist.get_world_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(spec, world_size=world, device=name)
    try:
        if spec["impl"] == "ours":
            step = _ours(spec, device)
        else:
            from .bench_peers import build
            step = build(spec, device)
        result["peer_config"] = getattr(step, "config", None)
        times, loss = [], float("nan")
        for i in range(spec["warmup"] + spec["steps"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times, dtype=torch.float64)
        on_gpu = device.type == "cuda"  # allocated: what tensors held; reserved: + the allocator's slack
        mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else 0.0,
                            torch.cuda.max_memory_reserved(device) / 2**30 if on_gpu else 0.0], dtype=torch.float64)
        if device.type == "cuda":
            slowest, mem = slowest.to(device), mem.to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        times = slowest.cpu().tolist()
        med = statistics.median(times)
        cfg = bench_model(spec["preset"], spec["seq_len"])
        tokens = spec["mbs"] * spec["gas"] * spec["dp"] * spec["seq_len"]
        tok_s = tokens / med
        peak = peak_tflops(name)
        result.update(step_times_s=times, step_s=med, tokens_per_step=tokens,
                      tokens_per_s_per_gpu=tok_s / world,
                      tflops_per_gpu=model_tflops_per_gpu(tok_s, cfg, spec["seq_len"], world),
                      mfu=mfu(tok_s, cfg, spec["seq_len"], world, peak), peak_tflops=peak,
                      peak_mem_gib=mem[0].item(), peak_reserved_gib=mem[1].item(), loss=loss,
                      bubble=(spec["pp"] - 1) / (spec["gas"] + spec["pp"] - 1))
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    except ImportError as e:  # an optional peer (torchtitan: pip install .[bench]) is missing
        result["error"] = f"{e.name or e} is not installed (pip install .[bench])"
    return result


def main() -> int:
    warnings.filterwarnings("ignore")
    spec = json.loads(sys.argv[1])
    out = run(spec)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    sys.exit(main())
