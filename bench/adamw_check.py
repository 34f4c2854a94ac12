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


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _setup(sizes, dev, gen):
    flat = sum(sizes)
    master = torch.randn(flat, device=dev, generator=gen) * 0.02
    lp_flat = master.to(torch.bfloat16)
    grads = [torch.randn(n, device=dev, generator=gen).to(torch.bfloat16) for n in sizes]
    return master, lp_flat, grads


def check(dev) -> dict:
    from pipelines.fused_adamw import AdamW
    gen = torch.Generator(device=dev).manual_seed(0)
    sizes = [4099, 123457, 1 << 20, 77]
    master, lp_flat, grads = _setup(sizes, dev, gen)
    ref_master = master.clone().requires_grad_(True)
    ours_master = master.clone().requires_grad_(True)
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_master], fused=True, **kw)
    ours = AdamW([ours_master], fused=True, **kw)
    lps, at = [], 0
    for n, g in zip(sizes, grads):
        lp = lp_flat[at:at + n]
        lp.grad = g
        lps.append((lp, at))
        at += n
    coef = torch.tensor(0.37, device=dev)
    out = {}
    for step in range(3):
        for lp, _ in lps:  # fresh gradients every step
            lp.grad = torch.randn(lp.numel(), device=dev, generator=gen).to(torch.bfloat16)
        ref_master.grad = torch.cat([lp.grad.float() for lp, _ in lps]) * coef
        ref.step()
        lp_flat.fill_(float("nan"))  # every output element must be written
        ours.bf16_grads, ours.grad_coef = [lps], coef
        ours.step()
        del ours.bf16_grads, ours.grad_coef
    rs, os_ = ref.state[ref_master], ours.state[ours_master]
    out["rel_err_master"] = _rel(ours_master.detach(), ref_master.detach())
    out["rel_err_exp_avg"] = _rel(os_["exp_avg"], rs["exp_avg"])
    out["rel_err_exp_avg_sq"] = _rel(os_["exp_avg_sq"], rs["exp_avg_sq"])
    out["rel_err_bf16_weights"] = _rel(lp_flat.float(), ref_master.detach().to(torch.bfloat16).float())
    out["bf16_weights_all_written"] = bool(torch.isfinite(lp_flat).all())
    out["step_counter"] = [float(rs["step"]), float(os_["step"])]
    before = [ours_master.detach().clone(), os_["exp_avg"].clone(), lp_flat.clone(), os_["step"].clone()]
    ours.bf16_grads, ours.grad_coef, ours.found_inf = [lps], coef, torch.ones((), device=dev)
    ours.step()
    del ours.bf16_grads, ours.grad_coef, ours.found_inf
    after = [ours_master.detach(), os_["exp_avg"], lp_flat, os_["step"]]
    out["found_inf_leaves_state"] = all(torch.equal(a, b) for a, b in zip(before, after))
    out["ok"] = (max(out["rel_err_master"], out["rel_err_exp_avg"], out["rel_err_exp_avg_sq"]) < 1e-6
                 and out["rel_err_bf16_weights"] < 1e-3 and out["bf16_weights_all_written"]
                 and out["found_inf_leaves_state"] and out["step_counter"][0] == out["step_counter"][1])
    return out


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
    master, lp_flat, grads = _setup(sizes, dev, gen)
    lps, at = [], 0
    for n, g in zip(sizes, grads):
        lp = lp_flat[at:at + n]
        lp.grad = g
        lps.append((lp, at))
        at += n
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
