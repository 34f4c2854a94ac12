"""pipelines/bf16_step.py: DeepSpeed's BF16_Optimizer with the sync-free step and no all-reduce
over a DP group of one trains exactly as with DeepSpeed's own step and its all-reduce in fp32
(``communication_data_type: fp32``; DeepSpeed's default bf16 rounds the fp32 accumulation), on
a real engine (bf16 on CPU, clipping active), checkpoints load across the two, and a non-finite gradient norm is skipped on the device by the fused AdamW
(``found_inf``): weights, moments and step counters untouched, the step reported skipped."""
import copy

import pytest
import torch

# grad_clip 0.05: the tiny model's norms are ~1, so every step clips (the path that differs most)
OVERRIDES = ["model.preset=tiny", "data.seq_len=16", "data.synthetic=true", "train.micro_batch_size=2",
             "train.grad_accum_steps=2", "train.precision=bf16", "train.grad_clip=0.05", "train.lr=3e-3"]


def _engine(sync_free: bool, fused_adamw: bool = False, extra=()):
    from launch.batches import open_batches
    from megatron_llama.config import load_config
    from pipelines import engine as engine_mod
    from pipelines.topology import build_topology, init_distributed

    cfg = load_config(None, OVERRIDES + list(extra))
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, 1, device)
    saved = (engine_mod.make_step_sync_free, engine_mod.build_optimizer, engine_mod.skip_single_rank_allreduce,
             engine_mod.deepspeed_config)
    if not sync_free:  # DeepSpeed's own step, and its all-reduce over the one DP rank in fp32
        engine_mod.make_step_sync_free = lambda opt: False
        engine_mod.skip_single_rank_allreduce = lambda *a: False
        engine_mod.deepspeed_config = lambda *a: dict(saved[3](*a), communication_data_type="fp32")
    if fused_adamw:  # torch's fused AdamW kernel exists on the CPU too: the GPU's found_inf path
        engine_mod.build_optimizer = lambda model, cfg, dev: torch.optim.AdamW(
            engine_mod.param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
            betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps, fused=True)
    try:
        eng = engine_mod.TrainEngine(cfg, layout, topo, device, lambda s: 1.0)
    finally:
        (engine_mod.make_step_sync_free, engine_mod.build_optimizer, engine_mod.skip_single_rank_allreduce,
         engine_mod.deepspeed_config) = saved
    assert eng.sync_free_step == sync_free == eng.single_rank_allreduce_skipped
    batches, _ = open_batches(cfg, 0, layout.dp_rank, layout.dp, rank_zero_first=lambda fn: fn())
    return eng, batches, (lambda: eng.train_step(next(batches) for _ in range(2)))


def _params(eng):
    return torch.cat([p.detach().float().flatten() for p in eng.engine.module.parameters()])


def _train(rank, world, sync_free: bool, ckpt_dir: str):
    eng, _, step = _engine(sync_free)
    results = [step() for _ in range(2)]
    eng.save(ckpt_dir, "step2", {})
    results.append(step())
    return [(r.loss, r.grad_norm, r.skipped) for r in results], _params(eng)


def _resume(rank, world, sync_free: bool, ckpt_dir: str):
    eng, batches, step = _engine(sync_free)
    eng.load(ckpt_dir, "step2")
    for _ in range(4):  # the two steps' micro-batches the checkpoint has seen
        next(batches)
    r = step()
    return (r.loss, r.grad_norm, r.skipped), _params(eng)


@pytest.mark.distributed
def test_sync_free_step_trains_and_resumes_like_deepspeed(dist_pool, tmp_path):
    pool = dist_pool(1)
    (ref, ref_params), = pool.run(_train, False, str(tmp_path / "ds"))
    (ours, params), = pool.run(_train, True, str(tmp_path / "ours"))
    assert all(r[1] > 0.05 for r in ref)  # clipping was active on every step
    assert ours == ref
    assert torch.equal(params, ref_params)
    # a checkpoint written by one step resumes under the other, to the same third step
    (third, resumed_params), = pool.run(_resume, True, str(tmp_path / "ds"))
    assert third == ref[2] and torch.equal(resumed_params, ref_params)
    (third, resumed_params), = pool.run(_resume, False, str(tmp_path / "ours"))
    assert third == ours[2] and torch.equal(resumed_params, params)


def _nan_step(rank, world, sync_free: bool, fused_adamw: bool):
    from test_train_spikes import scaled_logits  # no step_gate: the optimizer alone decides

    eng, _, step = _engine(sync_free, fused_adamw)
    inner = eng.optimizer.optimizer  # the client AdamW
    step(), step()

    def state():
        return _params(eng), copy.deepcopy(inner.state_dict()["state"])
    before, ds_skipped = state(), eng.engine.skipped_steps
    with scaled_logits(float("nan")):
        r = step()
    after = state()
    same = torch.equal(before[0], after[0]) and all(
        torch.equal(torch.as_tensor(before[1][i][k]), torch.as_tensor(after[1][i][k])) for i in before[1] for k in before[1][i])
    r2 = step()
    return (r.skipped, r.grad_norm, same, eng.engine.skipped_steps - ds_skipped, r2.skipped,
            r2.loss, r2.grad_norm), _params(eng)


@pytest.mark.distributed
def test_nonfinite_norm_skipped_on_device(dist_pool):
    pool = dist_pool(1)
    (ref, ref_params), = pool.run(_nan_step, False, True)       # DeepSpeed's host check
    (ours, params), = pool.run(_nan_step, True, True)           # found_inf in the fused AdamW
    (host, _), = pool.run(_nan_step, True, False)     # unfused: the host check
    assert ref[:5] == (True, float("inf"), True, 1, False)
    assert ours == ref and host == ref
    assert torch.equal(params, ref_params)  # (the unfused AdamW rounds differently from the fused one)
