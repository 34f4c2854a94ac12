"""GPU parity of our LlamaModel with Hugging Face, and which SDPA kernel our attention runs.

Single process, TP = 1. Builds one set of seeded random weights (O(1) activations), loads them
into:

* HF ``LlamaForCausalLM`` in fp32 with eager attention -- the gold reference (TF32 off);
* HF ``LlamaForCausalLM`` in the test dtype (bf16 on GPU) with ``attn_implementation="sdpa"``;
* our ``LlamaModel`` in the test dtype, through ``hf_to_native`` + ``load_full_state``;

and reports the relative error ``||x - gold||_2 / ||gold||_2`` of the logits (and loss) of
ours and of HF-in-the-same-dtype. Ours passes if its error is at most 1.5x HF's own error in
that dtype, or at most 2e-2.

Then it runs our attention (forward + backward) under ``torch.profiler`` and lists the kernels
whose names mention flash / cudnn / fmha / efficient, and the SDPA aten op that dispatched,
asserting that the math fallback (``_scaled_dot_product_attention_math``) did not run; and it
forces each backend with ``torch.nn.attention.sdpa_kernel`` to report which accept our GQA call.

Usage (GPU; the default shape: hidden 1024, 4 layers, 16 heads, 8 KV heads, vocab 32000,
seq 1024, batch 2)::

    OUT=bench/results python bench/gpu_parity.py

CPU smoke check (fp32)::

    OUT=/tmp/parity python bench/gpu_parity.py --device cpu --seq 128

Writes ``$OUT/gpu_parity.json`` (``OUT`` defaults to ./bench/results). Exit status 1 if a
check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNEL_WORDS = ("flash", "cudnn", "fmha", "efficient")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm()).item()


def init_parallel(device: torch.device, seed: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"),
                     RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        # megatron-core's layers need the model-parallel CUDA RNG state (STACK-NOTES)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def random_hf_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with O(1) activations (HF's std-0.02 init makes attention near uniform)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                noise = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                noise = 0.2 * noise
            elif "embed_tokens" not in name:
                noise = noise / p.shape[1] ** 0.5
            p.copy_(noise)


def profile_attention(attn: torch.nn.Module, x: torch.Tensor) -> dict:
    """Run attention fwd+bwd under the profiler: kernels and SDPA ops that ran."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    x = x.detach().requires_grad_(True)
    attn(x).float().square().mean().backward()  # warm-up (cuDNN plans, lazy init)
    if x.is_cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        attn(x).float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events()})
    sdpa_ops = [n for n in names if "scaled_dot_product" in n]
    kernels = [e.name for e in prof.events()
               if (x.is_cuda and str(e.device_type).endswith("CUDA")) or (not x.is_cuda and e.name.startswith("aten::"))]
    attn_kernels = sorted({k for k in kernels if any(w in k.lower() for w in KERNEL_WORDS)})
    return {"sdpa_ops": sdpa_ops, "attention_kernels": attn_kernels,
            "math_fallback_ran": any("attention_math" in n for n in names)}


def force_backends(attn: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> dict:
    """Run our attention with each SDPA backend forced; which ones accept our (GQA) call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        if not hasattr(SDPBackend, backend):
            out[backend] = {"ok": False, "error": "not in this torch"}
            continue
        # torch says *why* a backend refuses a call in warnings, before the generic error
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                xi = x.detach().requires_grad_(True)
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    y = attn(xi)
                    y.float().square().mean().backward()
                if x.is_cuda:
                    torch.cuda.synchronize()
                out[backend] = {"ok": True, "rel_err_vs_default": rel_err(y, reference)}
            except Exception as e:  # noqa: BLE001 - report, do not stop: this is the point
                out[backend] = {"ok": False, "error": (str(e).strip().splitlines() or [repr(e)])[0][:300]}
        reasons = sorted({str(w.message).strip()[:300] for w in caught
                          if "scaled_dot_product" in str(w.message) or "attention" in str(w.message).lower()})
        if reasons:
            out[backend]["reasons"] = reasons
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="dtype of ours and of the HF comparison model (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    import megatron.core
    import transformers

    from megatron_llama.config import ModelConfig, ParallelConfig
    from megatron_llama.model import LlamaModel
    from megatron_llama.model.hf_mapping import hf_config_kwargs, hf_to_native
    from megatron_llama.model.layout import load_full_state

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    # the gold reference must be true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    init_parallel(device, args.seed)

    cfg = ModelConfig(name="gpu-parity", hidden_size=args.hidden, num_layers=args.layers,
                      num_attention_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab,
                      max_seq_len=max(args.seq, 2048))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "?"), "python": platform.python_version(),
        "dtype": dtype_name, "tp": 1,
        "shape": dict(hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_attention_heads,
                      kv_heads=cfg.num_kv_heads, ffn_hidden=cfg.ffn_hidden_size, vocab=cfg.vocab_size,
                      seq=args.seq, batch=args.batch, params=cfg.num_params()),
        "rel_err_definition": "||x - gold||_2 / ||gold||_2 over the whole tensor, gold = HF fp32 eager",
    }

    # --- weights and the three models ------------------------------------------------------
    hf_kwargs = hf_config_kwargs(cfg)
    gold = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs, attn_implementation="eager"))
    random_hf_weights(gold, args.seed)
    gold = gold.to(device=device, dtype=torch.float32).eval()
    hf_lp = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs, attn_implementation="sdpa"))
    hf_lp.load_state_dict(gold.state_dict())
    hf_lp = hf_lp.to(device=device, dtype=dtype).eval()
    ours = LlamaModel(cfg, ParallelConfig(tp=1), dtype=dtype, device=device, seed=args.seed).eval()
    load_full_state(ours, hf_to_native(gold.state_dict(), cfg, 1), 0, 1)

    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        gold_out = gold(input_ids=tokens, labels=tokens)
        gold_logits, gold_loss = gold_out.logits.float(), gold_out.loss.float()
        del gold_out
        hf_out = hf_lp(input_ids=tokens, labels=tokens)
        hf_logits, hf_loss = hf_out.logits.float(), hf_out.loss.float()
        del hf_out
        ours_logits = ours(tokens).transpose(0, 1)[..., :cfg.vocab_size].float()   # [b, s, V]
        ours_loss = ours.loss(tokens[:, :-1], tokens[:, 1:]).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        report["forward_seconds_all_models"] = round(time.perf_counter() - t0, 3)

    ours_err, hf_err = rel_err(ours_logits, gold_logits), rel_err(hf_logits, gold_logits)
    bound = max(1.5 * hf_err, 2e-2) if dtype != torch.float32 else 1e-5
    report["logits"] = {
        "ours_vs_gold": ours_err, "hf_vs_gold": hf_err, "ours_vs_hf_same_dtype": rel_err(ours_logits, hf_logits),
        "ratio_ours_over_hf": ours_err / hf_err if hf_err > 0 else None,
        "max_abs_ours_vs_gold": (ours_logits - gold_logits).abs().max().item(),
        "max_abs_hf_vs_gold": (hf_logits - gold_logits).abs().max().item(),
        "argmax_agreement_ours": (ours_logits.argmax(-1) == gold_logits.argmax(-1)).float().mean().item(),
        "argmax_agreement_hf": (hf_logits.argmax(-1) == gold_logits.argmax(-1)).float().mean().item(),
        "bound": bound,
    }
    report["loss"] = {"gold": gold_loss.item(), "hf": hf_loss.item(), "ours": ours_loss.item(),
                      "ours_vs_gold": rel_err(ours_loss, gold_loss), "hf_vs_gold": rel_err(hf_loss, gold_loss)}
    checks = {"logits_within_bound": ours_err <= bound}
    del gold, hf_lp, gold_logits, hf_logits, ours_logits
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # --- which SDPA kernel our attention runs ----------------------------------------------
    attn = ours.layers[0].attention.train()
    x = torch.randn(args.seq, args.batch, cfg.hidden_size, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(args.seed + 2))
    with torch.no_grad():
        default_out = attn(x)
    report["attention_profile"] = profile_attention(attn, x)
    report["forced_backends"] = force_backends(attn, x, default_out)
    checks["math_fallback_not_used"] = not report["attention_profile"]["math_fallback_ran"]
    checks["fused_kernel_seen"] = bool(report["attention_profile"]["attention_kernels"])
    report["checks"] = checks
    report["passed"] = all(checks.values())

    out_dir = Path(os.environ.get("OUT") or "bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_parity.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    lg = report["logits"]
    print(f"device {report['device']} | torch {report['torch']} | {dtype_name} | shape {report['shape']}")
    print(f"logits rel err vs fp32 gold: ours {lg['ours_vs_gold']:.3e}, HF-{dtype_name}-sdpa "
          f"{lg['hf_vs_gold']:.3e} (ratio {lg['ratio_ours_over_hf'] or float('nan'):.2f}, bound {bound:.3e})")
    print(f"loss: gold {report['loss']['gold']:.5f} HF {report['loss']['hf']:.5f} ours {report['loss']['ours']:.5f}")
    ap_ = report["attention_profile"]
    print(f"SDPA ops: {ap_['sdpa_ops']}\nattention kernels: {ap_['attention_kernels']}")
    for b, r in report["forced_backends"].items():
        print(f"forced {b}: " + (f"ok (rel err vs default {r['rel_err_vs_default']:.2e})" if r["ok"]
                                 else f"refused: {r['error']}"))
        for reason in r.get("reasons", []):
            print(f"    {reason}")
    print(f"checks {checks} -> {'PASS' if report['passed'] else 'FAIL'}; wrote {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    try:
        rc = main()
    except Exception:  # noqa: BLE001 - still leave a JSON saying what broke
        traceback.print_exc()
        out_dir = Path(os.environ.get("OUT") or "bench/results")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_parity.json").write_text(json.dumps({"passed": False, "error": traceback.format_exc()}))
        rc = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(rc)
