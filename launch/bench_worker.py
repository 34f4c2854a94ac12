"""What every rank of one benchmark configuration runs (started by ``mllama-bench``).

``python -m launch.bench_worker SPEC_JSON OUT_JSON`` under a launcher (torchrun, deepspeed,
srun): real optimizer steps (forward, backward, ZeRO-1 AdamW) on synthetic tokens, warm-up
excluded. Every rank times every step; the step time of a configuration is the slowest
rank's, and rank 0 writes the aggregate to OUT_JSON.

SPEC: {"impl": "ours"|"hf-deepspeed", "preset", "tp", "pp", "dp", "mbs", "gas",
       "checkpointing", "seq_len", "steps", "warmup", "compile"}
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
    from megatron_llama.config import DataConfig, ParallelConfig, RunConfig, TrainConfig, preset
    model = preset(spec["preset"], max_seq_len=max(spec["seq_len"], 2048))
    return RunConfig(
        model=model,
        parallel=ParallelConfig(tp=spec["tp"], pp=spec["pp"], dp=spec["dp"],
                                activation_checkpointing=spec["checkpointing"]),
        train=TrainConfig(steps=spec["warmup"] + spec["steps"], micro_batch_size=spec["mbs"],
                          grad_accum_steps=spec["gas"], warmup_steps=1, compile=spec.get("compile")),
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
    return step


def _hf_deepspeed(spec: dict, device: torch.device):
    """The baseline users compare with: HF LlamaForCausalLM (SDPA) + DeepSpeed ZeRO-1 over DP."""
    import deepspeed
    import transformers

    from megatron_llama.config import preset
    from megatron_llama.data import MicroBatchIterator
    from megatron_llama.data.build import SyntheticDataset
    from megatron_llama.model.hf_mapping import hf_config_kwargs

    cfg = preset(spec["preset"], max_seq_len=max(spec["seq_len"], 2048))
    hcfg = transformers.LlamaConfig(**hf_config_kwargs(cfg), attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hcfg).to(torch.bfloat16)
    if spec["checkpointing"] == "full":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    world = dist.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": spec["mbs"], "gradient_accumulation_steps": spec["gas"],
          "train_batch_size": spec["mbs"] * spec["gas"] * world, "gradient_clipping": 1.0,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    data = SyntheticDataset(spec["seq_len"], cfg.vocab_size, 1234)
    batches = iter(MicroBatchIterator(data, 1234, 0, dist.get_rank(), world, spec["mbs"]))

    def step() -> float:
        total = 0.0
        for _ in range(spec["gas"]):
            tokens, labels = next(batches)
            logits = engine(tokens.to(device)).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten())
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        return float(total) / spec["gas"]
    return step


def run(spec: dict) -> dict:
    """Time one configuration on the current distributed world; every rank returns the aggregate."""
    from megatron_llama.flops import mfu, model_tflops_per_gpu, peak_tflops
    from megatron_llama.config import preset
    from pipelines.topology import init_distributed

    device, _ = init_distributed()
    world = dist.get_world_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(spec, world_size=world, device=name)
    try:
        step = (_hf_deepspeed if spec["impl"] == "hf-deepspeed" else _ours)(spec, device)
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
        mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                           dtype=torch.float64)
        if device.type == "cuda":
            slowest, mem = slowest.to(device), mem.to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        times = slowest.cpu().tolist()
        med = statistics.median(times)
        cfg = preset(spec["preset"], max_seq_len=max(spec["seq_len"], 2048))
        tokens = spec["mbs"] * spec["gas"] * spec["dp"] * spec["seq_len"]
        tok_s = tokens / med
        peak = peak_tflops(name)
        result.update(step_times_s=times, step_s=med, tokens_per_step=tokens,
                      tokens_per_s_per_gpu=tok_s / world,
                      tflops_per_gpu=model_tflops_per_gpu(tok_s, cfg, spec["seq_len"], world),
                      mfu=mfu(tok_s, cfg, spec["seq_len"], world, peak), peak_tflops=peak,
                      peak_mem_gib=mem.item(), loss=loss,
                      bubble=(spec["pp"] - 1) / (spec["gas"] + spec["pp"] - 1))
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
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
