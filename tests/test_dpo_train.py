"""DPO runs on the 3D engine: the same numbers in every layout, and bad input refused in one line.

Layout equivalence (like tests/test_train_equivalence.py): a tiny random ``LlamaForCausalLM``
saved with ``save_pretrained`` is the policy's start and the reference (``train.init_from=hf:DIR``);
the same 200 pairs of the shipped preference set, global batch 4 pairs, 4 steps. TP1·PP1·DP1 and
TP2·PP2·DP2 each compute their own reference pass (own ``dpo.reference_dir``), so the pass itself
is compared too (vocab-parallel log-probs at TP2, on the last of two pipeline stages, rows split
over DP2), then the losses, gradient norms and TRL-style reward metrics of every step. Both runs
add the RPO term (``dpo.rpo_alpha``): its mean over the chosen answer tokens of the global batch
must not depend on how the batch is split into micro-batches and DP ranks, and at step 1 the loss
is exactly ``log 2 + alpha * nll`` (policy == reference).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
RTOL = 1e-5
ALPHA = 0.2  # dpo.rpo_alpha


@pytest.fixture(scope="module")
def dpo_start(tmp_path_factory):
    """(hf model dir, 200-pair corpus, cache dir) shared by the tests of this module."""
    import torch
    import transformers

    from megatron_llama.config import preset
    from megatron_llama.model.hf_mapping import hf_config_kwargs

    root = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(preset("tiny")))).float() \
        .save_pretrained(root / "hf")
    lines = (ROOT / "data" / "preferences.jsonl").read_text().splitlines()[:200]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    # the policy's tokenizer lives in its HF directory, as in a real export (init_from carries it)
    from megatron_llama.data.tokenizer_sp import train_tokenizer
    texts = root / "texts.txt"
    texts.write_text("".join(f"[INST] {_text(r, 'prompt', 'messages')} [/INST] {_text(r, 'chosen')} "
                             f"{_text(r, 'rejected')}\n" for r in map(json.loads, lines)))
    train_tokenizer([str(texts)], str(root / "hf" / "tokenizer"), preset("tiny").vocab_size)
    return root


def _text(record: dict, *keys) -> str:
    """The words of a preference record's field(s): strings, turns or lists of turns."""
    out = []
    for k in keys:
        v = record.get(k)
        for x in (v if isinstance(v, list) else [v]):
            out.append(x.get("content", "") if isinstance(x, dict) else (x or ""))
    return " ".join(out)


def overrides(root: Path, tp=1, pp=1, dp=1, extra=()):
    mbs = 2 if dp == 1 else 1  # global batch 4 pairs = mbs x gas 2 x dp
    return ["model.preset=tiny", "train.objective=dpo", f"train.init_from=hf:{root}/hf", "data.seq_len=96",
            f"data.corpus={root}/pairs.jsonl", f"data.cache_dir={root}/data", "data.valid_fraction=0.05",
            f"train.micro_batch_size={mbs}", "train.grad_accum_steps=2", "train.global_batch_size=4",
            f"train.steps={STEPS}", "train.warmup_steps=1", "train.lr=3e-3", "train.weight_decay=0",
            "train.precision=fp32", "train.seed=7", "train.eval_iters=1", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.dp={dp}", "dpo.beta=0.5", f"dpo.rpo_alpha={ALPHA}", *extra]


def _train(rank, world, args):
    from launch.train import train
    from megatron_llama.config import load_config
    s = train(load_config(None, args), log=False, save=False)
    return s.losses, s.grad_norms, s.metrics


def _run(dist_pool, root, tp, pp, dp):
    ref_dir = root / f"ref-tp{tp}pp{pp}dp{dp}"
    results = dist_pool(tp * pp * dp).run(_train, overrides(root, tp, pp, dp, [f"dpo.reference_dir={ref_dir}"]))
    for other in results[1:]:  # every rank reports the same numbers
        assert other[0] == pytest.approx(results[0][0], rel=1e-6)
    files = sorted(glob.glob(str(ref_dir / "*.npz")))
    assert len(files) == 2, files  # the training and the held-out split
    return results[0], [np.load(f)["logps"] for f in files]


@pytest.mark.distributed
def test_dpo_is_the_same_in_every_layout(dist_pool, dpo_start):
    (losses, norms, metrics), tables = _run(dist_pool, dpo_start, 1, 1, 1)
    (losses3, norms3, metrics3), tables3 = _run(dist_pool, dpo_start, 2, 2, 2)
    for a, b in zip(tables, tables3):  # the reference pass, pair by pair (NaN: pairs of the other split)
        assert np.array_equal(np.isnan(a), np.isnan(b)) and (~np.isnan(a)).sum() > 0
        ok = ~np.isnan(a)
        assert np.allclose(b[ok], a[ok], rtol=RTOL, atol=0), np.abs(b[ok] / a[ok] - 1).max()
    assert len(losses) == STEPS and max(losses) - min(losses) > 1e-3, "the run should move its weights"
    # at step 0 the policy is the reference: log 2 plus the NLL term, per chosen token of the global batch
    assert losses[0] == pytest.approx(np.log(2) + ALPHA * metrics[0]["nll"], rel=1e-6)
    print(f"\nDPO TP2·PP2·DP2 vs TP1: losses {losses3} vs {losses}; grad norms {norms3} vs {norms}")
    assert losses3 == pytest.approx(losses, rel=RTOL, abs=0)
    assert norms3 == pytest.approx(norms, rel=RTOL, abs=0)
    # rewards are beta * (log p - log p_ref), differences of log-probs of ~-70 each: their layout noise is
    # that of the log-probs (rel 1e-6), not relative to the small difference. Shares of pairs (accuracy,
    # prefers_chosen) are compared exactly from step 2 on: at step 1 policy == reference and the
    # rewards are ties broken by rounding.
    for step, (m, m3) in enumerate(zip(metrics, metrics3), start=1):
        assert set(m) == set(m3) and "rewards/margins" in m
        scale = 0.5 * abs(m["logps/chosen"])  # beta * |log p|
        for k in m:
            if k.startswith("logps/") or k == "nll":
                assert m3[k] == pytest.approx(m[k], rel=RTOL), (step, k)
            elif k.startswith("rewards/") and k != "rewards/accuracies":
                assert abs(m3[k] - m[k]) <= 2e-6 * scale, (step, k, m3[k], m[k])
            elif step > 1 or k == "reference_prefers_chosen":
                assert m3[k] == m[k], (step, k, m3[k], m[k])


def _reward_model_hf(directory: Path) -> str:
    """A real (tiny, random) LlamaForSequenceClassification directory, as reward models are exported."""
    import transformers

    from megatron_llama.config import preset
    from megatron_llama.model.hf_mapping import hf_config_kwargs
    config = transformers.LlamaConfig(**hf_config_kwargs(preset("tiny")), num_labels=1)
    transformers.LlamaForSequenceClassification(config).save_pretrained(directory)
    return f"hf:{directory}"


BAD_INPUT = {  # name: (overrides, words the error line must contain)
    "beta 0": (["dpo.beta=0"], "dpo.beta=0 must be > 0"),
    "beta negative": (["dpo.beta=-0.5"], "dpo.beta=-0.5 must be > 0"),
    "no reference": (["train.init_from=null"], "needs a reference model"),
    "reward model as policy": (["train.init_from={reward}"], "is a reward model"),
    "cdpo with ipo": (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "sigmoid loss only"),
    "unknown loss": (["dpo.loss=hinge"], "dpo.loss='hinge'"),
    "rpo_alpha negative": (["dpo.rpo_alpha=-0.1"], "dpo.rpo_alpha=-0.1 must be a finite number >= 0"),
    "rpo_alpha nan": (["dpo.rpo_alpha=nan"], "dpo.rpo_alpha=nan must be a finite number >= 0"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_dpo_input_is_one_line_and_status_2(name, tmp_path, capsys, monkeypatch):
    from launch.train import main
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args, words = BAD_INPUT[name]
    if any("{reward}" in a for a in args):
        reward = _reward_model_hf(tmp_path / "reward-hf")
        args = [a.replace("{reward}", reward) for a in args]
        capsys.readouterr()  # save_pretrained's progress bar
    code = main([str(ROOT / "configs" / "dpo-tiny-cpu.yaml"), f"train.save_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing started
