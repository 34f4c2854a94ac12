"""The systems ``mllama-bench --baseline`` compares against, each as a step function.

* ``hf-deepspeed``: HF ``LlamaForCausalLM`` (SDPA) in bf16 + DeepSpeed ZeRO-1 over DP, eager.
* ``hf-compiled``: the same with each decoder layer ``.compile()``d (what a user tuning HF does).
* ``torchtitan`` / ``torchtitan-fp8``: torchtitan 0.2.2's own ``Trainer`` on the same shape,
  compiled (model and loss), no activation checkpointing; ``-fp8`` adds its torchao float8
  converter (tensorwise dynamic scaling, LM head excluded). torchtitan comes from the optional
  ``bench`` extra (``pip install .[bench]``). On one GPU it keeps fp32 parameters and trains
  under bf16 autocast (FSDP's bf16 parameters need dp_shard > 1): reported as run.

Every step function runs ``gas`` micro-batches of ``mbs`` random-token sequences and one
optimizer step, and returns the loss. Same shape, sequence, tokens per step as ours.
"""
from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist

PEERS = ("hf-deepspeed", "hf-compiled", "torchtitan", "torchtitan-fp8", "torchtitan-fp8-rowwise")


def hf_deepspeed(spec: dict, device: torch.device, compiled: bool = False):
    import deepspeed
    import transformers

    from megatron_llama.data import MicroBatchIterator
    from megatron_llama.data.build import SyntheticDataset
    from megatron_llama.model.hf_mapping import hf_config_kwargs

    from .bench_shapes import bench_model

    cfg = bench_model(spec["preset"], spec["seq_len"])
    hcfg = transformers.LlamaConfig(**hf_config_kwargs(cfg), attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hcfg).to(torch.bfloat16)
    if spec["checkpointing"] == "full":
        model.gradient_checkpointing_enable()
    if compiled:  # one graph per layer type, reused by every decoder layer
        for layer in model.model.layers:
            layer.compile()
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


def _torchtitan_args(spec: dict, dump: str) -> list[str]:
    steps = spec["warmup"] + spec["steps"]
    world = dist.get_world_size()
    args = ["--model.name", "mllama_bench", "--model.flavor", spec["preset"],
            "--training.local_batch_size", str(spec["mbs"]),
            "--training.global_batch_size", str(spec["mbs"] * spec["gas"] * world),
            "--training.seq_len", str(spec["seq_len"]), "--training.steps", str(steps),
            "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", str(10**6),
            "--activation_checkpoint.mode", "full" if spec["checkpointing"] == "full" else "none",
            "--job.dump_folder", dump] + (["--compile.enable"] if spec.get("compile") is not False else [])
    if spec["impl"].startswith("torchtitan-fp8"):
        recipe = "rowwise" if spec["impl"].endswith("rowwise") else "tensorwise"
        args += ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.recipe_name", recipe,
                 "--quantize.linear.float8.filter_fqns", "output"]
    return args


def torchtitan(spec: dict, device: torch.device):
    """torchtitan's Trainer over our preset's shape; we drive ``train_step`` with random tokens."""
    import dataclasses

    from torchtitan.config import ConfigManager
    from torchtitan.models import llama3
    from torchtitan.protocols.train_spec import TrainSpec, register_train_spec
    from torchtitan.train import Trainer

    from .bench_shapes import bench_model

    cfg = bench_model(spec["preset"], spec["seq_len"])
    base = llama3.get_train_spec()
    # multiple_of = the exact FFN width reproduces our ffn_hidden_size whatever its origin
    margs = llama3.TransformerModelArgs(
        dim=cfg.hidden_size, n_layers=cfg.num_layers, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size, multiple_of=cfg.ffn_hidden_size,
        norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_seq_len=spec["seq_len"])
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainSpec)}
    fields.update(model_args={spec["preset"]: margs}, build_dataloader_fn=None, build_tokenizer_fn=None,
                  build_validator_fn=None)
    try:
        register_train_spec("mllama_bench", TrainSpec(**fields))
    except ValueError:
        pass  # registered by an earlier configuration in this process
    dump = tempfile.mkdtemp(prefix="torchtitan-bench-")
    trainer = Trainer(ConfigManager().parse_args(_torchtitan_args(spec, dump)))
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())

    def batches():
        while True:
            t = torch.randint(0, cfg.vocab_size, (spec["mbs"], spec["seq_len"] + 1), generator=gen)
            yield {"input": t[:, :-1]}, t[:, 1:]

    it = batches()
    losses = []
    # train_step logs (and returns) nothing unless the metrics step says so: keep the last loss
    # from its forward_backward_step instead
    fwd_bwd = trainer.forward_backward_step

    def forward_backward_step(**kw):
        loss = fwd_bwd(**kw)
        losses.append(loss.detach())
        return loss
    trainer.forward_backward_step = forward_backward_step
    trainer.metrics_processor.should_log = lambda step: False  # its logger needs its own data loader

    def step() -> float:
        trainer.step += 1
        losses.clear()
        trainer.train_step(it)
        return float(torch.stack(losses).sum())
    step.config = {"parameters": "fp32 under bf16 autocast" if dist.get_world_size() == 1 else "FSDP bf16",
                   "compile": "model+loss", "float8": spec["impl"].startswith("torchtitan-fp8")}
    return step


def build(spec: dict, device: torch.device):
    impl = spec["impl"]
    if impl in ("hf-deepspeed", "hf-compiled"):
        return hf_deepspeed(spec, device, compiled=impl == "hf-compiled")
    if impl.startswith("torchtitan"):
        return torchtitan(spec, device)
    raise ValueError(f"unknown baseline {impl!r}: choose from {', '.join(PEERS)}")
