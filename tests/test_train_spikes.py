"""NaN and loss-spike handling with the real DeepSpeed engines (fp32, CPU, gloo).

* A skipped step (a real NaN through the model, and a real loss spike caught by the z-score)
  leaves the weights and the optimizer state exactly as they were, at PP1·DP2 (ZeRO-1
  partitions, and ZeRO-0) and PP2 (the pipeline engine's train_batch steps internally).
* End to end with ``spike_action=rollback``: a NaN batch is skipped, a spiking batch rolls the
  run back to its last checkpoint and its samples are never read again; the skipped range is
  recorded, so resuming from the checkpoint before the rollback trains on the same samples in
  the same steps. The same run checks TensorBoard's event files and ``mllama-plot``.
"""
import contextlib
import copy
import json
import shutil

import pytest

from test_train_equivalence import base_overrides


@contextlib.contextmanager
def scaled_logits(factor):
    """Multiply the LM head's logits by ``factor`` (NaN: a NaN loss and NaN gradients) while inside."""
    import torch
    from megatron_llama.model.head import LMHead

    def hook(module, _inputs, output):
        return output * factor if isinstance(module, LMHead) else None
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _skip_worker(rank, world, overrides):
    import torch
    from launch.batches import open_batches
    from launch.lr_schedule import schedule_for
    from launch.spikes import StepGuard
    from launch.train import rank_zero_first
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed

    cfg = load_config(None, overrides)
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    engine = TrainEngine(cfg, layout, topo, device, schedule_for(cfg.train))
    guard = StepGuard(cfg.train)
    engine.step_gate = guard.gate
    batches, _ = open_batches(cfg, 0, layout.dp_rank, layout.dp, rank_zero_first)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the client AdamW

    def state():
        weights = {n: p.detach().clone() for n, p in engine.engine.module.named_parameters()}
        return weights, copy.deepcopy(inner.state_dict()["state"])

    def same(a, b):
        (wa, sa), (wb, sb) = a, b
        return (all(torch.equal(wa[n], wb[n]) for n in wa) and sa.keys() == sb.keys()
                and all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i]))

    def step(factor=1.0):
        with scaled_logits(factor):
            result = engine.train_step(next(batches) for _ in range(cfg.train.grad_accum_steps))
        return result, guard.after_step(result)

    out = []
    for _ in range(3):  # warm-up: AdamW has state, the detector has history
        result, verdict = step()
        assert verdict.kind == "ok" and not result.skipped
    for name, factor in (("spike", 40.0), ("nan", float("nan"))):
        before = state()
        result, verdict = step(factor)
        out.append((name, verdict.kind, verdict.action, result.skipped, same(before, state())))
    before = state()
    result, verdict = step()
    out.append(("after", verdict.kind, verdict.action, result.skipped, same(before, state())))
    # the LR schedule advanced on the skipped steps too (a function of the step number: 6 steps)
    out.append(("lr", engine.lr == pytest.approx(cfg.train.lr * schedule_for(cfg.train)(6), rel=1e-12)))
    return out, guard.counts


@pytest.mark.distributed
@pytest.mark.parametrize("pp,dp,zero", [(1, 2, 1), (1, 2, 0), (2, 1, 1)], ids=["PP1-DP2-ZeRO1", "PP1-DP2-ZeRO0", "PP2"])
def test_skipped_step_leaves_weights_and_optimizer_state_unchanged(dist_pool, pp, dp, zero):
    """ZeRO-1 / the pipeline engine skip a NaN gradient norm themselves; ZeRO-0 fp32 does not
    (only our gate does); a loss spike goes through our gate everywhere."""
    overrides = base_overrides("tiny", dp=dp) + [f"parallel.pp={pp}", f"parallel.dp={dp}", "train.spike_action=skip",
                                                 "train.spike_warmup=2", "train.spike_window=10",
                                                 f"parallel.zero_stage={zero}"]
    results = dist_pool(pp * dp).run(_skip_worker, overrides)
    for out, counts in results:  # every rank took the same decisions
        assert out == [("spike", "spike", "skip", True, True),
                       ("nan", "nonfinite", "skip", True, True),
                       ("after", "ok", "none", False, False), ("lr", True)]
        assert counts == {"skipped": 2, "rollbacks": 0, "spikes": 1, "nonfinite": 1}


def _poisoned_run(rank, world, overrides, poison):
    """train() with the batches starting at the global sample positions in ``poison`` turned bad:
    their logits are multiplied by ``poison[start]`` (a NaN, or a large factor: a loss spike).
    The poison follows the data, not the step, so a skipped sample range stays skipped."""
    import numpy as np
    import torch
    from launch.train import train
    from megatron_llama.config import load_config
    from megatron_llama.data import SyntheticDataset, batch_indices
    from megatron_llama.model.embedding import Embedding
    from megatron_llama.model.head import LMHead

    cfg = load_config(None, overrides)
    t = cfg.train
    gbs = t.micro_batch_size * t.grad_accum_steps * cfg.parallel.dp
    ds = SyntheticDataset(cfg.data.seq_len, cfg.model.vocab_size, t.seed)
    bad = {}
    for start, factor in poison.items():
        for i in batch_indices(len(ds), t.seed, start, 0, 1, gbs):
            bad[tuple(ds[i][:16].tolist())] = factor
    current = {"factor": 1.0}

    def hook(module, inputs, output):
        if isinstance(module, Embedding):
            rows = [tuple(r[:16].tolist()) for r in inputs[0]]
            current["factor"] = next((bad[r] for r in rows if r in bad), 1.0)
        elif isinstance(module, LMHead) and current["factor"] != 1.0:
            return output * current["factor"]
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        s = train(cfg, log=rank == 0, save=True)
    finally:
        handle.remove()
    return s.losses, s.skipped_steps, s.rollbacks, s.final_step, np.isfinite(s.losses).tolist(), s.diverged


@pytest.mark.distributed
def test_nan_skip_and_spike_rollback_end_to_end(dist_pool, tmp_path):
    pool = dist_pool(2)
    run_a = tmp_path / "a"
    common = base_overrides("tiny", dp=2) + [
        "parallel.dp=2", "train.steps=8", "train.save_interval=2", "train.keep_last=0",
        "train.spike_action=rollback", "train.spike_warmup=2", "train.spike_window=10",
        "data.valid_fraction=0.01", "train.eval_interval=4", "train.eval_iters=1"]
    poison = {8: float("nan"), 16: 40.0}  # global batch 4: step 3 reads [8, 12), step 5 [16, 20)
    out = pool.run(_poisoned_run, common + [f"train.save_dir={run_a}", f"train.tensorboard_dir={run_a / 'tb'}"],
                   poison)
    losses, skipped, rollbacks, final_step, finite, diverged = out[0]
    assert out[1][:4] == out[0][:4] or out[1][1:4] == out[0][1:4]
    assert (skipped, rollbacks, final_step, diverged) == (1, 1, 8, None)
    assert len(losses) == 9 and finite == [True, True, False] + [True] * 6  # steps 1-5, back to 4, 5-8
    assert losses[4] > 3 * losses[3]  # the spike
    # the log lines (console and metrics.jsonl): step, samples, action
    from launch.run_log import read_records
    events = [r for r in read_records(str(run_a)) if r["type"] == "event"]
    assert [(e["step"], e["kind"], e["action"], e["samples"]) for e in events] == [
        (3, "nonfinite", "skip", [8, 12]), (5, "spike", "rollback", [16, 20])]
    assert events[0]["line"].startswith("step 3: NaN/Inf") and "samples [8, 12); step skipped" in events[0]["line"]
    assert events[1]["line"].startswith("step 5: loss spike") and "samples [16, 20); rolling back" in events[1]["line"]
    # the detector's recent losses travel with the checkpoint: a resumed run needs no new warm-up
    detector = json.loads((run_a / "step0000004" / "run.json").read_text())["spike_detector"]
    assert detector["seen"] == 3 and detector["history"] == pytest.approx([losses[0], losses[1], losses[3]])
    meta = json.loads((run_a / "step0000008" / "run.json").read_text())
    assert meta["skipped_samples"] == [[16, 20]] and meta["consumed_samples"] == 36
    assert json.loads((run_a / "skipped_samples.json").read_text()) == [[16, 20]]
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == 1
    assert [s for s, _ in summary["valid_losses"]] == [4, 4, 8]  # step 4 twice: before and after the rollback

    # Resuming from the checkpoint taken before the rollback reads the same samples in the same
    # steps: the spiking batch is skipped again (its poison is still there), the losses match.
    run_b = tmp_path / "b"
    shutil.copytree(run_a, run_b, ignore=shutil.ignore_patterns("step0000006", "step0000008", "tb", "plots"))
    (run_b / "latest").write_text("step0000004")
    resumed = pool.run(_poisoned_run, common + [f"train.save_dir={run_b}"], poison)[0]
    assert resumed[0] == pytest.approx(losses[5:], rel=1e-6) and resumed[1:3] == (0, 0)

    # TensorBoard: rank 0's event files hold the scalars, read back with TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_a / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_gpu",
                "train/mem_gib", "train/tokens_seen", "train/skipped_steps", "train/rollbacks", "valid/loss",
                "valid/ppl"):
        assert tag in tags, tag
    train_loss = acc.Scalars("train/loss")
    assert [e.step for e in train_loss] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert train_loss[-1].value == pytest.approx(losses[-1], rel=1e-6)
    assert acc.Scalars("train/rollbacks")[-1].value == 1 and acc.Scalars("train/tokens_seen")[-1].value == 36 * 32
    assert acc.Scalars("valid/loss")[-1].value == pytest.approx(summary["valid_losses"][-1][1], rel=1e-6)

    # mllama-plot: PNGs and the report, from metrics.jsonl alone
    from launch.plot import main as plot_main
    assert plot_main([str(run_b)]) == 0
    report = (run_b / "plots" / "report.txt").read_text()
    for name in ("loss", "lr", "grad_norm", "throughput", "memory"):
        assert (run_b / "plots" / f"{name}.png").stat().st_size > 10_000
    assert "steps: 8 of 8" in report and "1 restart(s)/resume(s)" in report
    assert "NaN/Inf steps: 1; loss spikes: 1; skipped steps: 1; rollbacks: 1" in report
    best = min(v for _, v in json.loads((run_b / "summary.json").read_text())["valid_losses"])
    assert f"validation loss: best {best:.4f}" in report and "status: done" in report

    # too many bad steps in a row: the run stops, diverged (exit status 4), and saves nothing
    run_c = tmp_path / "c"
    out = pool.run(_poisoned_run, common + [f"train.save_dir={run_c}", "train.spike_max_in_row=2"],
                   {8: float("nan"), 12: float("nan")})[0]
    assert out[3] == 4 and "2 steps in a row up to step 4" in out[5] and "exit status 4" in out[5]
    assert (run_c / "latest").read_text() == "step0000002"  # the last good checkpoint stays the newest
    assert json.loads((run_c / "summary.json").read_text())["diverged"] == out[5]


def test_main_exit_status_4_when_diverged(monkeypatch):
    import launch.train as lt
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(lt, "train", lambda cfg: lt.TrainSummary(diverged="training diverged: ..."))
    assert lt.main(["configs/tiny-cpu-3d.yaml", "parallel.tp=1", "parallel.pp=1", "parallel.dp=1"]) == 4
