"""Where one optimizer step of ``mllama-bench``'s configuration spends its GPU time.

    python bench/profile_step.py '{"precision": "fp8"}' --out bench/results/h200-profile-fp8.json

Builds the product engine exactly as ``launch/bench_worker.py`` does (one GPU, defaults:
llama-7b-8l, seq 2048, 16 x 1), runs warm-up steps, then profiles one step with CUDA activity
and sorts kernel time into GEMM, attention, optimizer, copies / casts and the rest, against the
step's wall time (the difference is launch gaps and host work).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CATEGORIES = [  # first match wins; kernel names of cuBLAS / cuDNN / inductor / torch on Hopper
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("gemm", ("nvjet", "gemm", "xmma", "cutlass", "sm90_", "scaled_mm", "f8f8")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "l2norm")),
    ("copies", ("copy", "memcpy", "memset", "cat", "fill")),
    ("cross_entropy", ("cross_entropy", "log_softmax", "nll")),
]


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (element-wise, norms, casts)"


def _gaps(prof) -> dict:
    """Idle stretches of the GPU between consecutive kernels: where the host is the bottleneck."""
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name)
    gaps, end, last = [], None, ""
    for start, stop, name in ks:
        if end is not None and start > end:
            gaps.append(((start - end) / 1e3, last, name))
        if end is None or stop > end:
            end, last = stop, name
    gaps.sort(key=lambda g: -g[0])
    return {"total_ms": sum(g[0] for g in gaps), "count": len(gaps),
            "over_50us_ms": sum(g[0] for g in gaps if g[0] > 0.05),
            "largest": [[round(g[0], 3), g[1][:100], g[2][:100]] for g in gaps[:40]]}


def _time_gate(step, n: int) -> dict:
    """Median wall ms of ``n`` steps without and with the spike gate, interleaved in rounds."""
    import statistics
    from launch.spikes import StepGuard
    times: dict = {"no_gate": [], "gate": []}
    for _ in range(n):
        for name in times:
            step.engine.step_gate = StepGuard(step.engine.cfg.train).gate if name == "gate" else None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    step.engine.step_gate = None
    return {k: round(statistics.median(v), 2) for k, v in times.items()} | {"all": times}


def _matmul_ceiling(shapes) -> dict:
    """Measured bf16 GEMM rate (TFLOP/s) per (m, k, n): fresh random operands, CUDA events, median of 10."""
    import statistics
    out = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        times = []
        for i in range(13):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(e0.elapsed_time(e1))
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / statistics.median(times) / 1e9, 1)
        del a, b
    return out


def _memory_breakdown(step) -> dict:
    """Where the bytes of one step go (GiB): static tensors by kind, then one gas-1 step by hand
    (forward + loss, backward, optimizer step) with the allocator's counters between phases."""
    import gc
    from megatron_llama.model import lm_loss
    eng = step.engine
    opt, module, gib = eng.optimizer, eng.engine.module, 2 ** 30
    inner = getattr(opt, "optimizer", opt)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts) / gib  # noqa: E731
    out = {"params_bf16": size(module.parameters()),
           "fp32_masters": size(getattr(opt, "fp32_groups_flat_partition", [])),
           "moments": size(v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()),
           "fp32_grad_buffer": sum(f.untyped_storage().nbytes() for f in getattr(opt, "fp32_groups_gradients_flat", []))
           / gib}
    gc.collect()
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated() / gib
    out["static_total"] = static
    out["static_other"] = static - out["params_bf16"] - out["fp32_masters"] - out["moments"] - out["fp32_grad_buffer"]
    tokens, labels = (t.to(eng.device) for t in next(step.batches))
    torch.cuda.reset_peak_memory_stats()
    fused = getattr(eng, "fused_loss", False)
    if fused:
        loss = eng.engine(tokens, labels=labels)
        out["logits_kept"] = 0.0
    else:
        logits = eng.engine(tokens)
        out["logits_kept"] = logits.numel() * logits.element_size() / gib
        loss = lm_loss(logits, labels)
        del logits
    torch.cuda.synchronize()
    out["after_forward"] = torch.cuda.memory_allocated() / gib
    out["activations"] = out["after_forward"] - static - out["logits_kept"]
    out["peak_forward"] = torch.cuda.max_memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    eng.engine.backward(loss)
    torch.cuda.synchronize()
    out["bf16_grads_after_backward"] = size(p.grad for p in module.parameters() if p.grad is not None)
    out["peak_backward"] = torch.cuda.max_memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    eng.engine.step()
    torch.cuda.synchronize()
    out["peak_optimizer_step"] = torch.cuda.max_memory_allocated() / gib
    out["after_step"] = torch.cuda.memory_allocated() / gib
    out["reserved_peak"] = torch.cuda.max_memory_reserved() / gib
    out["peak_allocated_any_phase"] = max(out["peak_forward"], out["peak_backward"], out["peak_optimizer_step"])
    out["allocator_slack_at_peak"] = out["reserved_peak"] - out["peak_allocated_any_phase"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default="{}", help="JSON overrides of the benchmark spec")
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--host", action="store_true", help="also cProfile one step's host side")
    p.add_argument("--memory", action="store_true", help="also break one step's memory down (GiB)")
    p.add_argument("--ceiling", action="store_true", help="also measure the bf16 matmul ceiling")
    p.add_argument("--gate", type=int, default=0, metavar="N",
                   help="also time N steps each with and without the trainer's spike gate (launch/spikes.py)")
    args = p.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))
    from launch.bench_worker import _ours
    from pipelines.topology import init_distributed

    spec = dict(impl="ours", preset="llama-7b-8l", tp=1, pp=1, dp=1, mbs=16, gas=1, checkpointing="none",
                seq_len=2048, steps=1, warmup=args.warmup, compile=None, precision="auto", fp8_recipe="tensorwise")
    spec.update(json.loads(args.spec))
    device, _ = init_distributed()
    step = _ours(spec, device)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA and "#" not in ev.key:  # not annotations
            kernels[ev.key] = kernels.get(ev.key, 0.0) + t / 1e3  # ms
    cats: dict[str, float] = {}
    for name, ms in kernels.items():
        cats[_category(name)] = cats.get(_category(name), 0.0) + ms
    gpu = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    result = {"spec": spec, "device": torch.cuda.get_device_name(), "wall_ms": wall * 1e3, "gpu_busy_ms": gpu,
              "idle_ms": wall * 1e3 - gpu, "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
              "top_kernels_ms": [[k[:120], round(v, 2)] for k, v in top],
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    result["gaps"] = _gaps(prof)
    print(f"step wall {wall * 1e3:.1f} ms, GPU busy {gpu:.1f} ms, "
          f"idle between kernels {result['gaps']['total_ms']:.1f} ms")
    for g in result["gaps"]["largest"][:12]:
        print(f"  gap {g[0]:7.2f} ms after {g[1][:60]} before {g[2][:60]}")
    for c, ms in result["categories_ms"].items():
        print(f"  {c:<36} {ms:8.1f} ms")
    for k, v in top[:15]:
        print(f"  {v:8.2f} ms  {k[:100]}")
    if args.host:  # where the host spends a step (Python), syncs included
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        step()
        torch.cuda.synchronize()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
        result["host_profile"] = buf.getvalue()
        buf2 = io.StringIO()
        pstats.Stats(pr, stream=buf2).sort_stats("tottime").print_stats(25)
        print(buf2.getvalue()[-6000:])
    if args.gate:  # the gate reads the loss and norm on the host before the update: what does it cost?
        result["spike_gate_step_ms"] = _time_gate(step, args.gate)
        print("median step ms, without / with the spike gate:", result["spike_gate_step_ms"])
    if args.memory:
        result["memory_gib"] = _memory_breakdown(step)
        print("memory (GiB):", json.dumps(result["memory_gib"]))
    if args.ceiling:
        from launch.bench_shapes import bench_model
        cfg = bench_model(spec["preset"], spec["seq_len"])
        tok = spec["mbs"] * spec["seq_len"]
        result["matmul_ceiling_tflops"] = _matmul_ceiling(
            [(8192, 8192, 8192), (tok, cfg.hidden_size, 2 * cfg.ffn_hidden_size)])
        gemm_ms = result["categories_ms"].get("gemm", 0.0)
        matmul_tflop = 6 * cfg.num_params() * tok * spec["gas"] / 1e12
        result["gemm_tflops_achieved"] = round(matmul_tflop / gemm_ms * 1e3, 1) if gemm_ms else None
        print("matmul ceiling TFLOP/s:", result["matmul_ceiling_tflops"], "GEMMs achieved:",
              result["gemm_tflops_achieved"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
