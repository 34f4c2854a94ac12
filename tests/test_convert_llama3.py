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
from test_convert_cli import _meta_weights
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


# --- Meta's original Llama 3 format ----------------------------------------------------------------
META3 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=556, multiple_of=32, ffn_dim_multiplier=1.3,
             norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
META_SEQ = 160


def _tiktoken_file(path: Path) -> None:
    """A tiktoken-format tokenizer.model: the 256 bytes and 44 merges (300 ranks; + 256 specials = 556 ids)."""
    import base64
    tokens = [bytes([i]) for i in range(256)]
    for word in (b"th", b"he", b"the", b" t", b" the", b"in", b"an", b"er", b"on", b" a", b"re", b"at", b"en",
                 b"nd", b" s", b"ed", b"or", b"es", b" w", b"is", b"it", b"ing", b" o", b"ar", b" c", b"ou",
                 b" b", b" f", b"al", b"le", b"ti", b" p", b"as", b"to", b"st", b"ion", b" m", b"ic", b"ro",
                 b" d", b"ent", b" in", b" and", b" of"):
        tokens.append(word)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))


def _meta3_reference(w: dict, p: dict, tokens: torch.Tensor, factor) -> torch.Tensor:
    """Meta's Llama 3 forward written from its description: complex (interleaved-pair) RoPE whose frequencies,
    with use_scaled_rope, are rescaled one by one (8192-token original context, low/high factors 1 and 4)."""
    hd = p["dim"] // p["n_heads"]
    freqs = (1.0 / p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)).tolist()
    if factor is not None:
        scaled = []
        for fr in freqs:
            wavelen = 2 * 3.141592653589793 / fr
            if wavelen < 8192 / 4:
                scaled.append(fr)
            elif wavelen > 8192 / 1:
                scaled.append(fr / factor)
            else:
                smooth = (8192 / wavelen - 1) / (4 - 1)
                scaled.append((1 - smooth) * fr / factor + smooth * fr)
        freqs = scaled
    from test_convert_cli import _meta_reference
    return _meta_reference(w, p, tokens, torch.tensor(freqs))


@pytest.mark.parametrize("tied", [False, True], ids=["llama3.1-2-shards", "llama3.2-tied"])
def test_meta_llama3_to_native_matches_reference(tmp_path, capsys, tied):
    from checkpoints_tools.verify import native_logits
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.data.tokenizer import Tokenizer
    from test_convert_cli import _write_meta
    params = dict(META3, **({"rope_scaling_factor": 32.0} if tied else {}))
    factor = 32.0 if tied else 8.0
    w = _meta_weights(params, tied=tied)
    _write_meta(w, params, tmp_path / "meta", shards=1 if tied else 2)
    _tiktoken_file(tmp_path / "meta" / "tokenizer.model")
    flags = [] if tied else ["--rope-scaling-factor", "8"]  # 3.1's params.json does not say its factor
    assert _run(["meta-to-native", str(tmp_path / "meta"), str(tmp_path / "n"), "--tp", "2", *flags]) == 0
    ck = open_native(tmp_path / "n")
    assert ck.model.rope_scaling.factor == factor and ck.model.tie_embeddings == tied
    tok = Tokenizer.load(ck.config.data.tokenizer)
    assert tok.kind == "tiktoken" and tok.vocab_size == params["vocab_size"]
    tokens = torch.randint(0, params["vocab_size"], (1, META_SEQ), generator=torch.Generator().manual_seed(1))
    ref = _meta3_reference(w, params, tokens, factor)
    err = ((native_logits(str(tmp_path / "n"), tokens) - ref).norm() / ref.norm()).item()
    unscaled = ((_meta3_reference(w, params, tokens, None) - ref).norm() / ref.norm()).item()
    print(f"meta llama3 {'tied' if tied else '2 shards'}: rel err {err:.2e}; without the scaling {unscaled:.2e}")
    assert err < 1e-5
    assert unscaled > 100 * 1e-5  # the reference itself shows that dropping use_scaled_rope would be caught


def _meta_refused(capsys, meta: Path, out: Path, words: str, flags=()) -> None:
    capsys.readouterr()
    assert _run(["meta-to-native", str(meta), str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_meta_params_that_disagree_or_are_unknown_are_refused(tmp_path, capsys):
    from test_convert_cli import _write_meta
    w = _meta_weights(META3)
    _write_meta(w, META3, tmp_path / "meta", shards=2)
    out = tmp_path / "out"
    _meta_refused(capsys, tmp_path / "meta", out, "use_scaled_rope but no rope_scaling_factor: pass "
                  "--rope-scaling-factor 8")
    for name, edit, words in [
            ("kv", dict(n_kv_heads=4), "layers.0.attention.wk.weight has shape (16, 64) but params.json"),
            ("ffn", dict(ffn_dim_multiplier=1.0), "feed_forward.w1.weight has shape (112, 64) but params.json"),
            ("vocab", dict(vocab_size=600), "tok_embeddings.weight has shape (556, 32) but params.json"),
            ("layers", dict(n_layers=3), "layers.2"),
            ("unknown", dict(qk_norm=True), "key qk_norm=True is not understood")]:
        d = tmp_path / name
        d.mkdir()
        for f in (tmp_path / "meta").glob("consolidated.*.pth"):
            (d / f.name).symlink_to(f)
        (d / "params.json").write_text(json.dumps(dict(META3, **edit)))
        _meta_refused(capsys, d, out, words, ["--rope-scaling-factor", "8"])
