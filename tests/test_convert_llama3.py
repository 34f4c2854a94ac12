"""Llama 3 conversion in one process: RoPE scaling read from ``rope_parameters`` (transformers 5) and
``rope_scaling`` (older files), written back so transformers 5 reads the same parameters, ``verify``
failing by default on a wrong model, and every config.json field our model cannot represent refused
(one ``error:`` line, exit status 2, nothing written)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints_tools.convert import main
from test_model_parity import hf_reference

LLAMA3_ROPE = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)


def _cfg(**over):
    from megatron_llama.config import preset
    return preset("tiny-gqa", vocab_size=501, max_seq_len=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, **over)


@pytest.fixture(scope="module")
def hf_llama3(tmp_path_factory) -> Path:
    """A transformers-5 save of a Llama 3.1-style tiny model (config.json has rope_parameters)."""
    d = tmp_path_factory.mktemp("l3") / "hf"
    hf_reference(_cfg(), "llama", seed=7).save_pretrained(d)
    return d


def _run(argv) -> int:
    return main(argv + ["--no-progress"])


def _edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    edit(c)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_rope_parameters_round_trip_and_verify(hf_llama3, tmp_path, capsys):
    import transformers

    from megatron_llama.checkpoint.native_weights import open_native
    assert "rope_parameters" in json.loads((hf_llama3 / "config.json").read_text())
    # the symptom: this converted silently without the scaling (5.5e-3); now it is read and verified
    capsys.readouterr()
    assert _run(["hf-to-native", str(hf_llama3), str(tmp_path / "n"), "--tp", "2", "--verify", "yes"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("verify: 64 fixed tokens") and "bound 1e-05" in line, line  # 2 x original context
    assert open_native(tmp_path / "n").model.rope_scaling == _cfg().rope_scaling
    assert _run(["native-to-hf", str(tmp_path / "n"), str(tmp_path / "back"), "--dtype", "fp32", "--verify", "yes"]) == 0
    want = transformers.AutoConfig.from_pretrained(hf_llama3).rope_parameters
    assert transformers.AutoConfig.from_pretrained(tmp_path / "back").rope_parameters == want
    # an older file: rope_scaling + rope_theta at the top level gives the same model
    old = _edit(hf_llama3, tmp_path / "old", lambda c: c.update(
        rope_theta=c["rope_parameters"].pop("rope_theta"), rope_scaling=c.pop("rope_parameters")))
    assert _run(["hf-to-native", str(old), str(tmp_path / "n-old"), "--verify", "yes"]) == 0
    assert open_native(tmp_path / "n-old").model == open_native(tmp_path / "n").model


def test_verify_fails_on_a_wrong_model(hf_llama3, tmp_path, capsys):
    """The same weights converted with the scaling dropped: verify exits 1 with one error line."""
    plain = _edit(hf_llama3, tmp_path / "plain", lambda c: c.update(
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert _run(["hf-to-native", str(plain), str(tmp_path / "wrong"), "--verify", "no"]) == 0
    capsys.readouterr()
    assert main(["verify", str(hf_llama3), str(tmp_path / "wrong")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: logits of") and "> 1e-05" in err[-1], err
    rel = float(err[0].split("relative ")[1].split(" ")[0])
    assert rel > 1e-3, rel  # far outside the bound, not a rounding question
    assert main(["verify", str(hf_llama3), str(tmp_path / "wrong"), "--tolerance", "1"]) == 0


def test_bf16_copy_passes_under_the_bf16_bound(hf_llama3, tmp_path, capsys):
    assert _run(["hf-to-native", str(hf_llama3), str(tmp_path / "b"), "--dtype", "bf16", "--verify", "no"]) == 0
    capsys.readouterr()
    assert main(["verify", str(hf_llama3), str(tmp_path / "b")]) == 0
    assert "bound 3e-02: float32 vs bfloat16: rounding" in capsys.readouterr().err


def _refused(capsys, src: Path, out: Path, words: str) -> None:
    capsys.readouterr()
    assert _run(["hf-to-native", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


REFUSED = {
    "unknown-rope": (lambda c: c["rope_parameters"].update(rope_type="longrope"), "rope scaling.type='longrope'"),
    "missing-field": (lambda c: c["rope_parameters"].pop("low_freq_factor"), "lacks low_freq_factor"),
    "rope-extra-key": (lambda c: c["rope_parameters"].update(beta_fast=32), "beta_fast is not used by llama3"),
    "rope-disagree": (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "disagree"),
    "attention-bias": (lambda c: c.update(attention_bias=True), "attention_bias=true puts a bias on q, k, v and o"),
    "mlp-bias": (lambda c: c.update(mlp_bias=True), "mlp_bias=true is not supported"),
    "head-dim": (lambda c: c.update(head_dim=16), "head_dim 16 != hidden_size / num_attention_heads (8)"),
    "partial-rotary": (lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "hidden-act": (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    "dropout": (lambda c: c.update(attention_dropout=0.1), "attention_dropout=0.1"),
    "unknown-field": (lambda c: c.update(logit_softcapping=30.0), "field logit_softcapping=30.0 is not understood"),
    "qwen2-sliding": (lambda c: c.update(architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                         sliding_window=64), "sliding-window attention is not supported"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_fields_that_change_the_math_are_refused(hf_llama3, tmp_path, capsys, case):
    edit, words = REFUSED[case]
    _refused(capsys, _edit(hf_llama3, tmp_path / case, edit), tmp_path / "out", words)


def test_rope_scaling_with_a_missing_field_in_a_run_config(capsys, tmp_path):
    """§5: the run-config side of the same error, through mllama-train's CLI (one line, exit 2)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "launch.train", str(root / "configs" / "tiny-cpu-3d.yaml"),
                          "model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4}",
                          f"train.save_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith("error: model.rope_scaling (llama3) lacks original_max_position_embeddings"), err
    assert not (tmp_path / "run").exists()
