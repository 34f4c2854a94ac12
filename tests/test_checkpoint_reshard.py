"""Reshard a TP2·PP2·DP2 ZeRO-1 checkpoint (model AND optimizer state) and train on at another layout.

One uninterrupted 6-step TP2·PP2·DP2 run saves at step 3 (and 6); its step-3 checkpoint is
resharded to TP1·PP1·DP1, TP4·PP1·DP2, TP1·PP4·DP2 and TP2·PP1·DP4 (ZeRO-2), each run resumes
from it with ``train.save_dir=OUT`` through the training entry point, and steps 4-6 must give
the uninterrupted run's losses and gradient norms (fp32, rel 1e-5), and its step-6 masters,
Adam moments and step count. The vocabulary (254) is padded at TP4 only, so dropping and
re-padding the padding rows is exercised. A store whose optimizer state was reset (what a
loader that silently restarts the optimizer produces) must fail the same check.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from test_train_equivalence import base_overrides

TOL = 1e-5
COMMON = base_overrides("tiny", dp=2) + ["model.vocab_size=254", "train.steps=6", "train.keep_last=0"]
_SAVED = {}


def layout(tp, pp, dp, zero=1):
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", f"parallel.zero_stage={zero}",
            "train.micro_batch_size=1", f"train.grad_accum_steps={4 // dp}"]


def _train(rank, world, overrides):
    from launch.train import train
    from megatron_llama.config import load_config
    s = train(load_config(None, overrides), log=False, save=True)
    return s.losses, s.grad_norms, s.resumed_from


def _load_and_save(rank, world, overrides):
    """What a resumed run does before its first step, then save at once (no training step)."""
    from launch.lr_schedule import schedule_for
    from megatron_llama import checkpoint
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed
    cfg = load_config(None, overrides)
    device, _ = init_distributed()
    lay, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    engine = TrainEngine(cfg, lay, topo, device, schedule_for(cfg.train))
    step, consumed = checkpoint.resume(engine, lay, cfg.train.save_dir)
    assert step == 3 and consumed == 12
    checkpoint.save(engine, cfg, lay, cfg.train.save_dir, step, consumed, 0.0, reason="test")


def saved_run(dist_pool, tmp_path_factory):
    """The uninterrupted TP2·PP2·DP2 run (once per session): checkpoints at steps 3 and 6."""
    if not _SAVED:
        root = tmp_path_factory.mktemp("tp2pp2dp2")
        losses, norms, _ = dist_pool(8).run(_train, COMMON + layout(2, 2, 2) + [
            "train.save_interval=3", f"train.save_dir={root}"])[0]
        _SAVED.update(root=root, losses=losses, norms=norms)
    return _SAVED


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_states_close(ours: Path, ref: Path, tol: dict) -> None:
    """Every parameter's fp32 master and Adam moments, as full tensors, and the step count."""
    from megatron_llama.checkpoint.optimizer_state import iter_param_states, open_native, optimizer_step
    assert optimizer_step(ours) == optimizer_step(ref)
    theirs = {row.name: states for row, states in iter_param_states(open_native(ref))}
    count = 0
    for row, states in iter_param_states(open_native(ours)):
        for key, t in states.items():
            assert rel_err(t, theirs[row.name][key]) <= tol[key], (row.name, key, rel_err(t, theirs[row.name][key]))
        count += 1
    assert count == len(theirs)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp,zero", [(1, 1, 1, 1), (4, 1, 2, 1), (1, 4, 2, 1), (2, 1, 4, 2)])
def test_reshard_then_train_matches_uninterrupted(dist_pool, tmp_path, tmp_path_factory, tp, pp, dp, zero):
    from checkpoints_tools.reshard import reshard
    ref = saved_run(dist_pool, tmp_path_factory)
    out = tmp_path / "out"
    reshard(str(ref["root"] / "step0000003"), str(out), tp, pp, dp, zero, progress=False)
    meta = json.loads((out / "step0000003" / "run.json").read_text())
    assert meta["layout"] == {"tp": tp, "pp": pp, "dp": dp, "world_size": tp * pp * dp}
    assert meta["config"]["train"]["grad_accum_steps"] == 4 // dp and meta["consumed_samples"] == 12
    losses, norms, resumed = dist_pool(tp * pp * dp).run(
        _train, COMMON + layout(tp, pp, dp, zero) + [f"train.save_dir={out}"])[0]
    assert resumed == 3
    assert losses == pytest.approx(ref["losses"][3:], rel=TOL)
    assert norms == pytest.approx(ref["norms"][3:], rel=TOL)
    # the optimizer went on where it stopped: step count 6, same moments and masters as uninterrupted.
    # Masters get a looser bound: Adam divides by sqrt(v), so entries whose gradient is ~0 (rare
    # tokens' embedding rows) turn fp32 summation-order noise into update differences (seen 5e-5 of
    # the largest weight). The loaded state itself is exact: see the bitwise round trip below.
    assert_states_close(out / "step0000006", ref["root"] / "step0000006",
                        {"fp32": 1e-3, "exp_avg": 10 * TOL, "exp_avg_sq": 10 * TOL})


@pytest.mark.distributed
@pytest.mark.slow
def test_a_restarted_optimizer_is_caught(dist_pool, tmp_path, tmp_path_factory):
    """The guard the check above relies on: the same resume with the Adam moments and step count
    reset (DeepSpeed issue 6691's symptom) must NOT match the uninterrupted run."""
    from safetensors.torch import load_file, save_file

    from checkpoints_tools.reshard import reshard
    ref = saved_run(dist_pool, tmp_path_factory)
    out = tmp_path / "fresh"
    step_dir = reshard(str(ref["root"] / "step0000003"), str(out), 1, 1, 1, progress=False)
    for f in step_dir.glob("layer_*.safetensors"):
        tensors = load_file(f)
        save_file({k: (torch.zeros_like(v) if k.startswith("exp_avg") else v) for k, v in tensors.items()}, f)
    state = json.loads((step_dir / "trainer_state.json").read_text())
    (step_dir / "trainer_state.json").write_text(json.dumps(dict(state, optimizer_step=0)))
    from megatron_llama.checkpoint import integrity  # edited on purpose: not damage, so record the new files
    meta = json.loads((step_dir / "run.json").read_text())
    (step_dir / "run.json").write_text(json.dumps(dict(meta, files=integrity.manifest(step_dir, collective=False))))
    losses, norms, _ = dist_pool(1).run(_train, COMMON + layout(1, 1, 1) + [f"train.save_dir={out}"])[0]
    assert losses[0] == pytest.approx(ref["losses"][3], rel=TOL)  # same weights: same first loss
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[1:] + norms[1:], ref["losses"][4:] + ref["norms"][4:]))
    assert worst > 10 * TOL, f"a reset optimizer went unnoticed (worst relative difference {worst:.2e})"


_KILLED_MID_WRITE = """
import os, signal, sys
from megatron_llama.checkpoint import resharded
from checkpoints_tools.reshard import reshard
original = resharded.write_store
def write_then_die(ckpt, step_dir, meta, on_param=None):
    def on(name, nbytes):  # the first parameter is on disk: killed mid-write, as by the OOM killer
        os.kill(os.getpid(), signal.SIGKILL)
    original(ckpt, step_dir, meta, on_param=on)
resharded.write_store = write_then_die
reshard(sys.argv[1], sys.argv[2], 1, 1, 1, progress=False)
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_reshards_leftover_is_removed_a_live_ones_kept(dist_pool, tmp_path, tmp_path_factory):
    import signal
    import subprocess
    import sys

    from checkpoints_tools.output_dir import _host
    from checkpoints_tools.reshard import reshard
    ref = saved_run(dist_pool, tmp_path_factory)
    src, out = ref["root"] / "step0000003", tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), DS_ACCELERATOR="cpu")
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, str(src), str(out)], env=env)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    (left,) = tmp_path.glob(".out.reshard-*.tmp")
    assert left.name == f".out.reshard-{killed.pid}@{_host()}.tmp" and list(left.rglob("layer_000.safetensors"))
    assert not out.exists()
    older = tmp_path / f".out.reshard-{killed.pid}.tmp"  # the name an older version used, same dead PID
    elsewhere = tmp_path / f".out.reshard-{killed.pid}@another-node.tmp"  # shared file system: not ours to judge
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        running = tmp_path / f".other.reshard-{live.pid}@{_host()}.tmp"  # a reshard still writing
        for d in (older, elsewhere, running):
            d.mkdir()
        reshard(str(src), str(out), 1, 1, 1, progress=False)
        assert not left.exists() and not older.exists()
        assert elsewhere.is_dir() and running.is_dir()
        assert (out / "latest").read_text() == "step0000003"
    finally:
        live.kill()
        live.wait()


def _init_from_logits(rank, world, overrides, tokens):
    """A new run at another layout started from ``train.init_from`` (as mllama-train builds it):
    its full logits on the last stage (None elsewhere), its log line and DeepSpeed's step count."""
    from megatron.core import parallel_state

    from launch.lr_schedule import schedule_for
    from launch.train import _init_from
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed
    from test_convert_parity import _logits
    cfg = load_config(None, overrides)
    device, _ = init_distributed()
    lay, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    load, line = _init_from(cfg, lay, save=False)
    engine = TrainEngine(cfg, lay, topo, device, schedule_for(cfg.train), init_weights=load)
    fresh = all(not s for s in engine.optimizer.optimizer.state.values())  # no Adam state yet
    out = _logits(engine, lay, tokens), line, engine.engine.global_steps, fresh
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_init_from_and_inspect_read_a_resharded_store(dist_pool, tmp_path, tmp_path_factory, capsys):
    """train.init_from=STORE at TP4·PP2 (not the store's layout, nor the source's TP2·PP2·DP2):
    the store's fp32 masters are the weights (logits equal the source checkpoint's, fp32), the
    optimizer is fresh, step 0. inspect describes the store from its headers."""
    from checkpoints_tools.convert import main
    from checkpoints_tools.reshard import reshard
    from checkpoints_tools.verify import native_logits
    from test_convert_parity import SEQ
    ref = saved_run(dist_pool, tmp_path_factory)
    src, store = ref["root"] / "step0000003", tmp_path / "store"
    reshard(str(src), str(store), 1, 1, 1, progress=False)
    capsys.readouterr()
    assert main(["inspect", str(store), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "resharded store" in out and "written for TP1·PP1·DP1" in out and "from TP2·PP2·DP2" in out, out
    assert "step      3, 12 samples" in out and "optimizer step 3" in out and "vocab     254 (stored unpadded)" in out
    assert "embedding.word_embeddings.weight" in out and "[254, 64]" in out and "F32" in out
    assert main(["native-to-hf", str(store), str(tmp_path / "hf"), "--no-progress"]) == 2
    assert "is a resharded store" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    tokens = torch.randint(0, 254, (2, SEQ), generator=torch.Generator().manual_seed(5))
    want = native_logits(str(src), tokens)
    results = dist_pool(8).run(_init_from_logits, COMMON + ["parallel.tp=4", "parallel.pp=2", "parallel.dp=1",
                                                            "train.micro_batch_size=1", "train.grad_accum_steps=4",
                                                            f"train.init_from={store}"], tokens)
    last = [r[0] for r in results if r[0] is not None]
    assert len(last) == 4  # the 4 TP ranks of the last stage
    for logits in last:
        assert torch.isinf(logits[..., 254:]).all()  # TP4 pads the vocabulary to 256
        assert rel_err(logits[..., :254], want) < TOL, rel_err(logits[..., :254], want)
    line, steps, fresh = results[0][1:]
    assert line == f"initialised from resharded store {store} (its fp32 masters): weights only, fresh optimizer, step 0"
    assert all(r[2] == 0 and r[3] for r in results)


TIED = COMMON + ["model.tie_embeddings=true", "train.steps=4"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 2), (1, 2, 2)])
def test_reshard_a_tied_pipeline_checkpoint(dist_pool, tmp_path, tmp_path_factory, tp, pp, dp):
    """Tied embeddings at TP2·PP2 (the head holds a copy of the embedding) resharded to PP1, where
    the head reads the one weight, and to another PP2, where the copy is written again: steps 3-4
    equal the uninterrupted run's (fp32, rel 1e-5)."""
    from checkpoints_tools.reshard import reshard
    if "tied" not in _SAVED:
        root = tmp_path_factory.mktemp("tied-tp2pp2")
        losses, norms, _ = dist_pool(4).run(_train, TIED + layout(2, 2, 1) + [
            "train.save_interval=2", f"train.save_dir={root}"])[0]
        _SAVED["tied"] = (root, losses, norms)
    root, losses, norms = _SAVED["tied"]
    out = tmp_path / "out"
    reshard(str(root / "step0000002"), str(out), tp, pp, dp, progress=False)
    got, got_norms, resumed = dist_pool(tp * pp * dp).run(_train, TIED + layout(tp, pp, dp) + [
        f"train.save_dir={out}"])[0]
    assert resumed == 2
    assert got == pytest.approx(losses[2:], rel=TOL) and got_norms == pytest.approx(norms[2:], rel=TOL)
    if pp == 1:  # the head's copy is checked against the embedding, not silently dropped
        import shutil

        from megatron_llama.config import ConfigError
        bad = tmp_path / "bad" / "step0000002"
        shutil.copytree(root / "step0000002", bad)
        f = bad / "zero_pp_rank_0_mp_rank_03_optim_states.pt"  # last stage (PP2), TP rank 1
        sd = torch.load(f, weights_only=False)
        osd = sd["optimizer_state_dict"]
        group, frag = next((g, m["6.output.weight"]) for g, m in enumerate(osd["param_slice_mappings"])
                           if "6.output.weight" in m)
        osd["single_partition_of_fp32_groups"][group].data[frag.start] += 1.0
        torch.save(sd, f)
        with pytest.raises(ConfigError, match=r"copy 6.output.weight of the tied embedding.word_embeddings.weight "
                                              r"differs from it \(fp32\)"):
            reshard(str(bad), str(tmp_path / "bad-out"), 1, 1, 2, progress=False)


def _all_tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _all_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _all_tensors(v, f"{prefix}/{i}")


@pytest.mark.distributed
@pytest.mark.slow
def test_round_trip_is_bitwise(dist_pool, tmp_path, tmp_path_factory):
    """TP2·PP2·DP2 -> reshard TP4·PP1·DP2 -> loaded and saved by that layout -> reshard
    TP2·PP2·DP2 -> loaded and saved: every tensor of every file equals the original's."""
    from checkpoints_tools.reshard import reshard
    ref = saved_run(dist_pool, tmp_path_factory)
    src = ref["root"] / "step0000003"
    mid, back = tmp_path / "tp4", tmp_path / "back"
    reshard(str(src), str(mid), 4, 1, 2, progress=False)
    # the streaming reader that native-to-hf --weights masters uses: native and resharded agree
    from megatron_llama.checkpoint.optimizer_state import master_layers
    from megatron_llama.checkpoint.resharded import iter_fp32_masters
    native, store = list(iter_fp32_masters(src)), list(iter_fp32_masters(mid))
    assert [n for n, _ in native] == [n for n, _ in store] and len(native) == 27
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(native, store))
    assert native[0][1].shape == (254, 64)  # vocabulary padding dropped
    layers = list(master_layers(src, torch.bfloat16))
    assert [name for name, _ in layers][:2] == ["embedding", "layers.0"] and len(layers) == 7
    assert all(t.dtype == torch.bfloat16 for _, ts in layers for t in ts.values())
    dist_pool(8).run(_load_and_save, COMMON + layout(4, 1, 2) + [f"train.save_dir={mid}"])
    assert json.loads((mid / "step0000003" / "run.json").read_text()).get("format") is None  # native again
    reshard(str(mid), str(back), 2, 2, 2, progress=False)
    dist_pool(8).run(_load_and_save, COMMON + layout(2, 2, 2) + [f"train.save_dir={back}"])
    files = sorted(p.name for p in src.glob("*.pt"))
    assert files == sorted(p.name for p in (back / "step0000003").glob("*.pt")) and len(files) == 26
    compared = 0
    for name in files:
        a = torch.load(src / name, weights_only=False)
        b = torch.load(back / "step0000003" / name, weights_only=False)
        ta, tb = dict(_all_tensors(a)), dict(_all_tensors(b))
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}{key}"
            compared += 1
        if "lr_scheduler" in a:
            assert a["lr_scheduler"] == b["lr_scheduler"] and a["global_steps"] == b["global_steps"]
    assert compared > 100


def test_next_global_batch_is_the_same_at_any_dp():
    """The samples of the step after the checkpoint (12 consumed) at DP 1/2/4 are the ones the
    uninterrupted DP2 run reads (order within the batch aside: the loss is their mean)."""
    from megatron_llama.data.sampler import batch_indices

    def step_samples(dp, mbs, gas, consumed=12, n=1000):
        out = []
        for _ in range(gas):
            for r in range(dp):
                out += batch_indices(n, 7, consumed, r, dp, mbs)
            consumed += mbs * dp
        return sorted(out)
    ref = step_samples(2, 1, 2)
    assert len(set(ref)) == 4
    for dp, mbs, gas in ((1, 1, 4), (1, 2, 2), (4, 1, 1), (2, 2, 1)):
        assert step_samples(dp, mbs, gas) == ref


# --- bad input: one `error:` line, exit status 2, nothing written ---------------------------------------

def _cli(args, capsys):
    from checkpoints_tools.convert import main
    code = main(["reshard", *map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.distributed
@pytest.mark.slow
def test_bad_input(dist_pool, tmp_path, tmp_path_factory, capsys):
    import shutil
    ref = saved_run(dist_pool, tmp_path_factory)
    src = ref["root"] / "step0000003"
    broken = tmp_path / "broken" / "step0000003"
    shutil.copytree(src, broken)
    (broken / "zero_pp_rank_1_mp_rank_02_optim_states.pt").unlink()
    damaged = tmp_path / "damaged" / "step0000003"
    shutil.copytree(src, damaged)
    (damaged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    nometa = tmp_path / "nometa" / "step0000003"  # DeepSpeed issue 5430: shards without their metadata
    shutil.copytree(src, nometa)
    f = nometa / "zero_pp_rank_1_mp_rank_03_optim_states.pt"
    sd = torch.load(f, weights_only=False)
    del sd["optimizer_state_dict"]["param_slice_mappings"]
    torch.save(sd, f)
    exists = tmp_path / "exists"
    exists.mkdir()
    cases = [([tmp_path / "nowhere", tmp_path / "o1", "--tp", 1, "--pp", 1], "does not exist"),
             ([tmp_path / "exists", tmp_path / "o2", "--tp", 1, "--pp", 1], "not a native checkpoint"),
             ([broken, tmp_path / "o3", "--tp", 1, "--pp", 1], "incomplete"),
             ([damaged, tmp_path / "o4", "--tp", 1, "--pp", 1], "damaged"),
             ([nometa, tmp_path / "o9", "--tp", 1, "--pp", 1], "param_slice_mappings"),
             ([src, tmp_path / "o5", "--tp", 3, "--pp", 1], "does not divide model.num_attention_heads"),
             ([src, tmp_path / "o6", "--tp", 1, "--pp", 5], "larger than model.num_layers"),
             ([src, tmp_path / "o7", "--tp", 1, "--pp", 1, "--dp", 3], "does not divide the global batch"),
             ([src, tmp_path / "o8", "--tp", 1, "--pp", 2, "--zero-stage", 2], "zero_stage=2 with parallel.pp=2"),
             ([src, exists, "--tp", 1, "--pp", 1], "--force")]
    for args, what in cases:
        code, err = _cli(args, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and what in err[0], (args, err)
    assert sorted(os.listdir(tmp_path)) == ["broken", "damaged", "exists", "nometa"]  # no partial output
    code, _ = _cli([src, exists, "--tp", 1, "--pp", 1, "--force"], capsys)
    assert code == 0 and (exists / "latest").read_text() == "step0000003"
