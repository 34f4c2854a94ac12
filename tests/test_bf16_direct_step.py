"""pipelines/bf16_direct_step.py + fused_adamw.py: at grad_accum_steps 1 and DP 1 the bf16 step
without an fp32 gradient buffer (AdamW reading the bf16 gradients, clip folded in, bf16 weights
written by the update) trains bitwise as the sync-free step with its fp32 buffer, on real
DeepSpeed engines (bf16 on CPU, every step clipped), at TP 1 and TP 2 (norm over the TP group,
replicated norms counted once); its buffer holds no memory; checkpoints resume across the two;
a non-finite norm skips the step with weights and moments untouched."""
import copy

import pytest
import torch

OVERRIDES = ["model.preset=tiny", "data.seq_len=16", "data.synthetic=true", "train.micro_batch_size=4",
             "train.grad_accum_steps=1", "train.precision=bf16", "train.grad_clip=0.05", "train.lr=3e-3"]


def _engine(direct: bool, tp: int = 1):
    from launch.batches import open_batches
    from megatron_llama.config import load_config
    from pipelines import engine as engine_mod
    from pipelines.topology import build_topology, init_distributed

    cfg = load_config(None, OVERRIDES + [f"parallel.tp={tp}"])
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, 1, device)
    saved = engine_mod.make_step_direct
    if not direct:
        engine_mod.make_step_direct = lambda *a: False
    try:
        eng = engine_mod.TrainEngine(cfg, layout, topo, device, lambda s: 1.0)
    finally:
        engine_mod.make_step_direct = saved
    assert eng.direct_step == direct and eng.sync_free_step
    batches, _ = open_batches(cfg, 0, layout.dp_rank, layout.dp, rank_zero_first=lambda fn: fn())
    return eng, batches, (lambda: eng.train_step([next(batches)]))


def _params(eng):
    return torch.cat([p.detach().float().flatten() for p in eng.engine.module.parameters()])


def _masters_and_moments(eng):
    inner = eng.optimizer.optimizer
    out = []
    for g in inner.param_groups:
        (p,) = g["params"]
        out += [p.detach().clone(), inner.state[p]["exp_avg"].clone(), inner.state[p]["exp_avg_sq"].clone(),
                inner.state[p]["step"].clone()]
    return out


def _train(rank, world, direct: bool, tp: int, ckpt_dir: str):
    eng, _, step = _engine(direct, tp)
    buffer_bytes = sum(f.untyped_storage().nbytes() for f in eng.optimizer.fp32_groups_gradients_flat)
    results = [step() for _ in range(2)]
    eng.save(ckpt_dir, "step2", {})
    results.append(step())
    return ([(r.loss, r.grad_norm, r.skipped) for r in results], _params(eng), _masters_and_moments(eng),
            buffer_bytes)


def _resume(rank, world, direct: bool, ckpt_dir: str):
    eng, batches, step = _engine(direct)
    eng.load(ckpt_dir, "step2")
    for _ in range(2):  # the micro-batches the checkpoint has seen
        next(batches)
    r = step()
    return (r.loss, r.grad_norm, r.skipped), _params(eng)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.distributed
def test_direct_step_trains_bitwise_like_the_fp32_buffer_and_resumes(dist_pool, tmp_path):
    pool = dist_pool(1)
    (ref, ref_params, ref_state, ref_bytes), = pool.run(_train, False, 1, str(tmp_path / "buf"))
    (ours, params, state, our_bytes), = pool.run(_train, True, 1, str(tmp_path / "direct"))
    assert all(r[1] > 0.05 for r in ref)  # clipping was active on every step
    assert ref_bytes > 0 and our_bytes == 0  # the fp32 gradient buffer is gone
    assert ours == ref
    assert torch.equal(params, ref_params) and _same(state, ref_state)
    (third, resumed), = pool.run(_resume, True, str(tmp_path / "buf"))
    assert third == ref[2] and torch.equal(resumed, ref_params)
    (third, resumed), = pool.run(_resume, False, str(tmp_path / "direct"))
    assert third == ours[2] and torch.equal(resumed, params)


@pytest.mark.distributed
def test_direct_step_at_tp2_equals_the_fp32_buffer(dist_pool, tmp_path):
    pool = dist_pool(2)
    ref = pool.run(_train, False, 2, str(tmp_path / "buf"))
    ours = pool.run(_train, True, 2, str(tmp_path / "direct"))
    for (r_res, r_params, r_state, _), (o_res, o_params, o_state, o_bytes) in zip(ref, ours):
        assert o_bytes == 0 and o_res == r_res
        assert torch.equal(o_params, r_params) and _same(o_state, r_state)
    assert ours[0][0] == ours[1][0]  # both TP ranks report the same loss and global norm


def _nan_step(rank, world):
    from test_train_spikes import scaled_logits

    eng, _, step = _engine(True)
    step(), step()
    inner = eng.optimizer.optimizer
    before = _params(eng), copy.deepcopy(inner.state_dict()["state"])
    with scaled_logits(float("nan")):
        r = step()
    after = _params(eng), inner.state_dict()["state"]
    same = torch.equal(before[0], after[0]) and all(
        torch.equal(torch.as_tensor(before[1][i][k]), torch.as_tensor(after[1][i][k]))
        for i in before[1] for k in before[1][i])
    r2 = step()
    return r.skipped, r.grad_norm, same, r2.skipped, all(p.grad is None for p in eng.engine.module.parameters())


@pytest.mark.distributed
def test_direct_step_skips_a_nonfinite_norm(dist_pool):
    (out,) = dist_pool(1).run(_nan_step)
    assert out == (True, float("inf"), True, False, True)  # and the bf16 gradients are freed after a step
