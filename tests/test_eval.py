"""``mllama-eval`` and ``train.eval_tasks`` with the real lm-evaluation-harness, offline.

A tiny model is trained a few steps (its in-training evaluation logged like the validation loss),
exported to HF in fp32 and converted to TP2·PP2. The shipped offline tasks (configs/eval_tasks:
multiple choice + greedy generation) then run through our backend at TP1 and at TP2·PP2 and through
lm-eval's own ``hf`` backend on the export: the same accuracy, the same generations, per-item
log-likelihoods within 1e-4. Nothing may come from the Hub: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE
are set and HF_HOME is an empty directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
TASKS = "mllama_story_color,mllama_story_count,mllama_corpus_ppl"
LIMIT = "12"
LL_TOL = 1e-4  # fp32 on both sides


def _env(tmp: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"))


def _run(tmp: Path, module: str, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=_env(tmp), capture_output=True,
                         text=True, timeout=600, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TP1 run of 20 steps that evaluated a task at its two checkpoints, its fp32 HF export, and
    the export converted to TP2·PP2."""
    tmp = tmp_path_factory.mktemp("eval")
    run = tmp / "run"
    _run(tmp, "launch.train", ROOT / "configs" / "tiny-cpu-3d.yaml", "parallel.tp=1", "parallel.pp=1",
         "parallel.dp=1", "train.steps=20", "train.save_interval=10", f"train.save_dir={run}",
         f"data.corpus={ROOT / 'data' / 'corpus.jsonl'}", f"data.cache_dir={tmp / 'data'}", "train.eval_interval=0",
         "train.eval_tasks=[mllama_story_color]", "train.eval_tasks_limit=8")
    hf = tmp / "hf"
    _run(tmp, "checkpoints_tools.convert", "native-to-hf", run, hf, "--dtype", "fp32", "--no-progress", "--verify", "no")
    tp2pp2 = tmp / "tp2pp2"
    _run(tmp, "checkpoints_tools.convert", "hf-to-native", hf, tp2pp2, "--tp", "2", "--pp", "2", "--no-progress",
         "--verify", "no")
    return {"tmp": tmp, "run": run, "hf": hf, "tp2pp2": tp2pp2}


def _evaluate(trained, target: Path, name: str) -> dict:
    out = trained["tmp"] / f"{name}.json"
    res = _run(trained["tmp"], "launch.eval", target, "--tasks", TASKS, "--limit", LIMIT, "--log-samples",
               "--no-progress", "--output", out)
    assert "mllama_story_color" in res.stdout and "acc" in res.stdout, res.stdout  # the table
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def native_tp1(trained):
    return _evaluate(trained, trained["run"], "native-tp1")


def _samples(result: dict, task: str) -> dict:
    return {s["doc_id"]: s for s in result["samples"][task]}


def _value(result: dict, task: str, metric: str) -> float:
    return next(r["value"] for r in result["rows"] if r["task"] == task and r["metric"] == metric)


def _assert_same(a: dict, b: dict) -> float:
    """Same accuracy and generations; returns the largest per-item log-likelihood difference."""
    for task, metric in (("mllama_story_color", "acc"), ("mllama_story_count", "exact_match (strip)")):
        assert _value(a, task, metric) == _value(b, task, metric), (task, a["rows"], b["rows"])
    sa, sb = _samples(a, "mllama_story_color"), _samples(b, "mllama_story_color")
    assert sorted(sa) == sorted(sb) and len(sa) == int(LIMIT)
    worst = 0.0
    for doc in sa:
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in sa[doc]["resps"]), (r[0] for r in sb[doc]["resps"])):
            worst = max(worst, abs(ll_a - ll_b))
            assert greedy_a == greedy_b
    ga, gb = _samples(a, "mllama_story_count"), _samples(b, "mllama_story_count")
    assert {d: s["resps"] for d, s in ga.items()} == {d: s["resps"] for d, s in gb.items()}
    return worst


def _rolling(result: dict) -> dict:
    return {d: s["resps"][0][0] for d, s in _samples(result, "mllama_corpus_ppl").items()}


def test_training_logs_eval_tasks_like_validation(trained):
    run = trained["run"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval_tasks"]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0.0 <= r["eval/mllama_story_color/acc"] <= 1.0 for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert [s for s, _ in summary["eval_tasks"]] == [10, 20]
    saved = json.loads((run / "eval_tasks" / "step0000020.json").read_text())
    assert saved["limit"] == 8 and saved["rows"][0]["task"] == "mllama_story_color"
    assert saved["rows"][0]["value"] == evals[-1]["eval/mllama_story_color/acc"]


def test_native_backend_matches_lm_eval_hf_backend(trained, native_tp1):
    hf = _evaluate(trained, trained["hf"], "hf")
    assert native_tp1["backend"] == "native" and hf["backend"] == "hf"
    worst = _assert_same(native_tp1, hf)
    print(f"max per-item log-likelihood difference, native TP1 vs lm-eval hf: {worst:.2e}")
    assert worst < LL_TOL
    # Rolling log-likelihood: lm-eval's LM contract scores a document after one prefix (BOS) token; lm-eval
    # 0.4.13's hf backend lets the tokenizer add a second BOS and scores that too, so the reference here is
    # transformers itself: the exported model and tokenizer, the document's tokens after one BOS.
    import torch
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(trained["hf"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(trained["hf"])
    docs = [json.loads(line)["text"] for line in
            (ROOT / "configs" / "eval_tasks" / "corpus_sentences.jsonl").read_text().splitlines()]
    ours = _rolling(native_tp1)
    assert sorted(ours) == list(range(int(LIMIT)))
    for d, ll in ours.items():
        ids = torch.tensor([tok(docs[d]).input_ids])
        assert ids[0, 0].item() == tok.bos_token_id and ids.shape[1] <= 256  # one window (max_seq_len 256)
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
        assert abs(ll - logp) < LL_TOL, (d, ll, logp)


def test_native_backend_tp2_pp2_equals_tp1(trained, native_tp1):
    split = _evaluate(trained, trained["tp2pp2"], "native-tp2pp2")
    assert split["layout"].startswith("TP2·PP2")
    worst = _assert_same(native_tp1, split)
    print(f"max per-item log-likelihood difference, TP2·PP2 vs TP1: {worst:.2e}")
    assert worst < LL_TOL
    ours, split = _rolling(native_tp1), _rolling(split)
    assert max(abs(ours[d] - split[d]) for d in ours) < LL_TOL


# --- bad input: one `error:` line, exit status 2, before any model is loaded (in-process) ---------------

def _fake_hf_dir(tmp: Path) -> Path:
    """An HF directory as far as the task check needs (it fails before the weights are read)."""
    d = tmp / "hf-like"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return d


def _eval_main(capsys, *argv) -> tuple[int, list[str]]:
    from launch.eval import main
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path


@pytest.mark.parametrize("task, words", [("no_such_task_xyz", "has no task"),
                                         ("arc_easy", "needs its dataset from the Hugging Face Hub")])
def test_unknown_or_network_task_is_one_line(offline_env, capsys, task, words):
    rc, err = _eval_main(capsys, _fake_hf_dir(offline_env), "--tasks", f"mllama_story_color,{task}")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_checkpoint_without_tokenizer_is_one_line(trained, tmp_path, capsys):
    import shutil
    step = trained["run"] / "step0000020"
    copy = tmp_path / "step0000020"
    shutil.copytree(step, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["config"]["data"]["cache_dir"] = str(tmp_path / "deleted-cache")  # the trained tokenizer is gone
    (copy / "run.json").write_text(json.dumps(meta))
    rc, err = _eval_main(capsys, copy, "--tasks", "mllama_story_color")
    assert rc == 2 and len(err) == 1 and "has no tokenizer" in err[0] and "--tokenizer" in err[0], err
    rc, err = _eval_main(capsys, copy, "--tasks", "mllama_story_color", "--tokenizer", tmp_path / "nope.model")
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0], err


def test_without_lm_eval_installed(tmp_path, capsys, monkeypatch):
    """lm-eval is optional: the package imports without it; mllama-eval and train.eval_tasks say how to get it."""
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    import importlib
    for module in ("launch.eval", "launch.eval_tasks", "launch.eval_in_training", "launch.eval_ranks",
                   "pipelines.forward_only", "launch.train"):
        importlib.import_module(module)
    rc, err = _eval_main(capsys, _fake_hf_dir(tmp_path), "--tasks", "mllama_story_color")
    assert rc == 2 and len(err) == 1 and "pip install 'megatron-llama[eval]'" in err[0], err
    from launch.train import main
    rc = main([str(ROOT / "configs" / "tiny-cpu-3d.yaml"), f"train.save_dir={tmp_path / 'run'}",
               "train.eval_tasks=[mllama_story_color]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "lm-evaluation-harness" in err[0], err
