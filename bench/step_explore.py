"""Exploration: one training step (fwd+bwd+ZeRO-1 AdamW) of ours vs HF under DeepSpeed.

Not the product benchmark (that is mllama-bench); this is the notebook of variants tried
while making the model fast. Usage (GPU): python bench/step_explore.py VARIANT [VARIANT...]
VARIANT = impl:mbs:gas[:opt,opt] with impl in {ours, hf}; opts: compile, cudnn, flash, sel, full.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def _init():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    from megatron.core import parallel_state, tensor_parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build(impl, opts, cfg):
    from megatron_llama.config import ParallelConfig
    if impl == "hf":
        import transformers
        from megatron_llama.model.hf_mapping import hf_config_kwargs
        hcfg = transformers.LlamaConfig(**hf_config_kwargs(cfg), attn_implementation="sdpa")
        with torch.device("cuda"):
            m = transformers.LlamaForCausalLM(hcfg).to(torch.bfloat16)

        class Wrap(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, tokens, labels):
                logits = self.m(tokens).logits.float()
                return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
        return Wrap(m)
    from megatron_llama.model import LlamaModel
    ck = "selective" if "sel" in opts else "full" if "full" in opts else "none"
    m = LlamaModel(cfg, ParallelConfig(activation_checkpointing=ck), dtype=torch.bfloat16, device="cuda",
                   compile="compile" in opts)
    if "compilefn" in opts:
        from megatron_llama.model import attention, mlp
        attention.apply_rotary = torch.compile(attention.apply_rotary)
        mlp.swiglu = torch.compile(mlp.swiglu)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens, labels):
            return self.m.loss(tokens, labels)
    return Wrap(m)


def run(spec, steps=6, warm=2):
    import deepspeed
    from megatron_llama.config import preset
    impl, mbs, gas, *rest = spec.split(":")
    mbs, gas = int(mbs), int(gas)
    opts = rest[0].split(",") if rest else []
    cfg = preset(os.environ.get("PRESET", "llama-7b-8l"))
    seq = 2048
    torch.cuda.reset_peak_memory_stats()
    model = build(impl, opts, cfg)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ds = {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
          "steps_per_print": 10**9}
    if "fp32acc" in opts:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}
    chosen = next((backends[o] for o in opts if o in backends),
                  [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (mbs, seq + 1), device="cuda", generator=g) for _ in range(gas)]
    times = []
    with sdpa_kernel(chosen, set_priority=True):
        for step in range(warm + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for d in data:
                loss = engine(d[:, :-1], d[:, 1:])
                engine.backward(loss)
                engine.step()
            torch.cuda.synchronize()
            if step >= warm:
                times.append(time.perf_counter() - t0)
        if os.environ.get("PROFILE") == spec:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for d in data:
                    loss = engine(d[:, :-1], d[:, 1:])
                    engine.backward(loss)
                    engine.step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
            out = os.environ.get("OUT", ".")
            open(os.path.join(out, "profile.txt"), "w").write(table)
            print(table[:6000])
    times.sort()
    med = times[len(times) // 2]
    tokens = mbs * gas * seq
    flops_tok = 6 * cfg.matmul_params() + 12 * cfg.num_layers * cfg.hidden_size * seq
    res = dict(spec=spec, step_s=med, tflops=flops_tok * tokens / med / 1e12,
               tok_s=tokens / med, peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=loss.item())
    print(json.dumps(res), flush=True)
    del engine, model, opt
    torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    import subprocess
    out = os.environ.get("OUT", ".")
    if sys.argv[1] == "--one":  # child: one variant, fresh process (DeepSpeed keeps engines alive)
        _init()
        res = run(sys.argv[2])
        open(os.path.join(out, f"one-{os.getpid()}.json"), "w").write(json.dumps(res))
        sys.exit(0)
    results = []
    for spec in sys.argv[1:]:
        before = set(os.listdir(out))
        proc = subprocess.run([sys.executable, __file__, "--one", spec])
        new = [f for f in set(os.listdir(out)) - before if f.startswith("one-")]
        if new:
            results.append(json.load(open(os.path.join(out, new[0]))))
            os.remove(os.path.join(out, new[0]))
        else:
            results.append(dict(spec=spec, error=f"exit {proc.returncode}"))
    json.dump(results, open(os.path.join(out, "explore.json"), "w"), indent=1)
    for r in results:
        print(r)
