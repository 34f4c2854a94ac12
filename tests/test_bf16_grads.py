"""pipelines/bf16_grads.py: DeepSpeed's BF16_Optimizer with one-pass gradient accumulation trains
exactly as DeepSpeed's own (bf16 -> fp32 is exact, the fp32 sum is the same), on a real engine."""
import pytest
import torch


def _train(rank, world, fused: bool):
    from launch.batches import open_batches
    from megatron_llama.config import load_config
    from pipelines import engine as engine_mod
    from pipelines.topology import build_topology, init_distributed

    cfg = load_config(None, ["model.preset=tiny", "data.seq_len=16", "data.synthetic=true",
                             "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.precision=bf16"])
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, 1, device)
    if not fused:  # DeepSpeed's own accumulation
        engine_mod.fuse_grad_accumulation, saved = (lambda opt: False), engine_mod.fuse_grad_accumulation
    try:
        eng = engine_mod.TrainEngine(cfg, layout, topo, device, lambda s: 1.0)
    finally:
        if not fused:
            engine_mod.fuse_grad_accumulation = saved
    assert eng.fused_grad_accumulation == fused
    batches, _ = open_batches(cfg, 0, layout.dp_rank, layout.dp, rank_zero_first=lambda fn: fn())
    losses = [eng.train_step(next(batches) for _ in range(2)) for _ in range(3)]
    params = torch.cat([p.detach().float().flatten() for p in eng.engine.module.parameters()])
    return [(r.loss, r.grad_norm) for r in losses], params


@pytest.mark.distributed
def test_fused_accumulation_trains_like_deepspeed(dist_pool):
    pool = dist_pool(1)
    (ref_losses, ref_params), = pool.run(_train, False)
    (losses, params), = pool.run(_train, True)
    assert losses == ref_losses
    assert torch.equal(params, ref_params)
