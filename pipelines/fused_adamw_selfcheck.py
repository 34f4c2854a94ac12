"""The Triton AdamW-from-bf16 update (``fused_adamw.py``) checked against torch's fused AdamW on this
device: fresh random masters, moments and bf16 gradients (sizes not multiples of the block), a clip
coefficient below 1, 3 steps, every bf16 output written, ``found_inf`` leaving the state untouched.

``bf16_direct_step`` runs it once per process before it takes the kernel on CUDA (a few ms), so a
kernel that is wrong on some card or Triton version falls back to DeepSpeed's step with one
warning instead of training wrong; ``bench/adamw_check.py`` records it with timings.
"""
from __future__ import annotations

import torch


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _setup(sizes, dev, gen):
    """fp32 masters, their flat bf16 copy, and (view of the copy, offset) pairs holding random bf16 grads."""
    flat = sum(sizes)
    master = torch.randn(flat, device=dev, generator=gen) * 0.02
    lp_flat = master.to(torch.bfloat16)
    grads = [torch.randn(n, device=dev, generator=gen).to(torch.bfloat16) for n in sizes]
    lps, at = [], 0
    for n, g in zip(sizes, grads):
        lp = lp_flat[at:at + n]
        lp.grad = g
        lps.append((lp, at))
        at += n
    return master, lp_flat, lps


def check(dev) -> dict:
    from pipelines.fused_adamw import AdamW
    gen = torch.Generator(device=dev).manual_seed(0)
    sizes = [4099, 123457, 1 << 20, 77]
    master, lp_flat, lps = _setup(sizes, dev, gen)
    ref_master = master.clone().requires_grad_(True)
    ours_master = master.clone().requires_grad_(True)
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_master], fused=True, **kw)
    ours = AdamW([ours_master], fused=True, **kw)
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
