"""The Triton AdamW-from-bf16 update (pipelines/fused_adamw.py) against torch's fused AdamW, on GPU.

    python bench/adamw_check.py --out bench/results/h100-adamw-check.json

Correctness: fresh random masters, moments and bf16 gradients per size (sizes not multiples of
the block), a clip coefficient below 1, 3 steps; torch's reference is its fused AdamW on
``grad.float() * coef`` followed by the fp32 -> bf16 copy. Reports the relative error of
masters, moments and bf16 weights, that every bf16 output element was written (poisoned with
NaN first), and that ``found_inf`` leaves everything untouched. Timing: one update of 1.75 B
parameters (llama-7b-8l's count, one tensor per layer shape) against torch's phase it replaces
(fp32 accumulation, zeroing, clip multiply, fused AdamW, fp32 -> bf16 copy), CUDA events, median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.fused_adamw_selfcheck import _setup, check  # noqa: E402


def _time(fn, reps=10) -> float:
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def timing(dev) -> dict:
    from pipelines.fused_adamw import AdamW
    d, f, v = 4096, 11008, 32000
    sizes = [v * d, v * d] + [3 * d * d, d * d, 2 * f * d, f * d] * 8 + [d] * 17  # llama-7b-8l
    gen = torch.Generator(device=dev).manual_seed(1)
    master, lp_flat, lps = _setup(sizes, dev, gen)
    m = master.clone().requires_grad_(True)
    ours = AdamW([m], fused=True, lr=3e-4, weight_decay=0.1)
    coef = torch.tensor(0.5, device=dev)

    def ours_step():
        ours.bf16_grads, ours.grad_coef = [lps], coef
        ours.step()
    t_ours = _time(ours_step)
    del ours, m
    m = master.clone().requires_grad_(True)
    buf = torch.zeros_like(master)
    m.grad = buf
    ref = torch.optim.AdamW([m], fused=True, lr=3e-4, weight_decay=0.1)
    views = [buf[o:o + lp.numel()] for lp, o in lps]

    def torch_phase():
        buf.zero_()
        torch._foreach_add_(views, [lp.grad for lp, _ in lps])
        torch._foreach_norm([lp.grad for lp, _ in lps], 2.0, dtype=torch.float32)
        buf.mul_(coef)
        ref.step()
        lp_flat.copy_(m.detach())
    t_torch = _time(torch_phase)
    n = sum(sizes)
    return {"params": n, "ours_ms": t_ours, "torch_phase_ms": t_torch,
            "ours_gbs": 28 * n / t_ours / 1e6, "bytes_per_param_ours": 28}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "check": check(dev), "timing": timing(dev)}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
