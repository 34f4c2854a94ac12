"""Run configs: YAML + ``key=value`` overrides, one-line errors, preset parameter counts."""
from __future__ import annotations

import dataclasses
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_llama.config import (ConfigError, ModelConfig, config_from_dict, config_to_dict,
                                   load_config, preset)

RUN_YAML = """\
model: {preset: tiny, vocab_size: 1024}
parallel: {tp: 2, pp: 2, activation_checkpointing: selective}
train: {steps: 200, lr: 1.0e-3, micro_batch_size: 4}
data: {seq_len: 128, synthetic: true}
"""


@pytest.fixture
def run_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(RUN_YAML)
    return p


# --- loading -------------------------------------------------------------------------------

def test_yaml_loads_into_typed_config(run_file):
    cfg = load_config(run_file)
    assert (cfg.model.name, cfg.model.vocab_size, cfg.model.hidden_size) == ("tiny", 1024, 64)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.activation_checkpointing) == (2, 2, "selective")
    assert cfg.train.steps == 200 and cfg.train.lr == 1e-3 and cfg.train.micro_batch_size == 4
    assert cfg.data.seq_len == 128 and cfg.data.synthetic is True
    assert cfg.train.seed == 1234  # untouched fields keep their defaults


def test_overrides_apply_on_top_of_yaml_with_types(run_file):
    cfg = load_config(run_file, ["train.lr=3e-4", "train.steps=7", "parallel.tp=1",
                                 "model.num_layers=2", "data.synthetic=false",
                                 "train.wandb_project=null", "model.rope_theta=500000"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # "3e-4" is a YAML string
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.parallel.tp == 1 and cfg.parallel.pp == 2
    assert cfg.model.num_layers == 2 and cfg.model.vocab_size == 1024  # YAML value kept
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.data.synthetic is False and cfg.train.wandb_project is None


def test_overrides_without_file_and_preset_shorthand(tmp_path):
    cfg = load_config(None, ["model.preset=llama2-70b", "parallel.tp=8"])
    assert (cfg.model.num_kv_heads, cfg.model.ffn_hidden_size, cfg.data.seq_len) == (8, 28672, 4096)
    p = tmp_path / "short.yaml"
    p.write_text("model: tiny-gqa\n")
    cfg = load_config(p, ["model.vocab_size=300"])  # `model: NAME` + a model override
    assert (cfg.model.name, cfg.model.num_kv_heads, cfg.model.vocab_size) == ("tiny-gqa", 4, 300)


def test_resolved_config_round_trips(run_file):
    cfg = load_config(run_file, ["train.lr=1e-4"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


# --- errors: one line, naming the field and the fix ------------------------------------------

def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_hidden_not_divisible_by_heads():
    msg = _error(["model.preset=tiny", "model.num_attention_heads=5"])
    assert "model.hidden_size=64" in msg and "model.num_attention_heads=5" in msg
    assert "pick heads that divide it" in msg


def test_kv_heads_not_dividing_heads():
    msg = _error(["model.preset=tiny-gqa", "model.num_kv_heads=3"])
    assert "model.num_kv_heads=3" in msg and "model.num_attention_heads=8" in msg
    assert "whole group of query heads" in msg


def test_tp_not_dividing_kv_heads():
    msg = _error(["model.preset=tiny-gqa", "parallel.tp=8"])
    assert "parallel.tp=8" in msg and "model.num_kv_heads=4" in msg and "use a tp that divides it" in msg


@pytest.mark.parametrize("overrides, field", [
    (["model.preset=tiny", "model.hiden_size=32"], "model.hiden_size"),      # with a preset
    (["model.hidden_size=64", "model.num_head=4"], "model.num_head"),        # without one
    (["model.preset=tiny", "train.learning_rate=1e-3"], "train.learning_rate"),
    (["model.preset=tiny", "parallel.tensor_parallel=2"], "parallel.tensor_parallel"),
])
def test_unknown_key(overrides, field):
    msg = _error(overrides)
    assert f"unknown key {field}" in msg
    assert "valid keys are" in msg  # the fix: the list of keys to choose from


def test_unknown_key_in_yaml_and_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: tiny\ntrain: {stpes: 10}\n")
    msg = _error([], p)
    assert "unknown key train.stpes" in msg and "steps" in msg
    p.write_text("model: tiny\ntrainer: {steps: 10}\n")
    msg = _error([], p)
    assert "trainer" in msg and "model, parallel, train, data" in msg
    assert "SECTION.KEY=VALUE" in _error(["model.preset=tiny", "lr=1e-3"])


@pytest.mark.parametrize("overrides, field, expected", [
    (["model.preset=tiny", "train.steps=many"], "train.steps", "expected an integer"),
    (["model.preset=tiny", "train.steps=2.5"], "train.steps", "expected an integer"),
    (["model.preset=tiny", "model.hidden_size=true"], "model.hidden_size", "expected an integer"),
    (["model.preset=tiny", "train.lr=fast"], "train.lr", "expected a number"),
    (["model.preset=tiny", "data.synthetic=maybe"], "data.synthetic", "expected true/false"),
    (["model.preset=tiny", "data.tokenizer=[a, b]"], "data.tokenizer", "expected a string"),
    (["model.preset=tiny", "data.sources=oops"], "data.sources", "expected a list"),
])
def test_wrong_type(overrides, field, expected):
    msg = _error(overrides)
    assert msg.startswith(f"{field}: {expected}"), msg


def test_wrong_type_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {preset: tiny, num_layers: four}\n")
    assert _error([], p).startswith("model.num_layers: expected an integer, got 'four'")


def test_bad_values_name_field_and_choices():
    msg = _error(["model.preset=tiny", "parallel.activation_checkpointing=some"])
    assert "parallel.activation_checkpointing='some'" in msg and "none, selective, full" in msg
    msg = _error(["model.preset=tiny-9b"])
    assert "unknown model preset 'tiny-9b'" in msg and "llama-7b" in msg


# --- parameter counts ------------------------------------------------------------------------

# Published sizes (LLaMA paper table 2, Llama 2 paper table 1) in billions, 3 significant digits.
PUBLISHED = {"llama-7b": 6.74, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.2,
             "llama2-7b": 6.74, "llama2-13b": 13.0, "llama2-70b": 69.0}


def _three_digits(n: int) -> float:
    return float(f"{n / 1e9:.3g}")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_param_counts_match_papers(name):
    tracemalloc.start()
    n = preset(name).num_params()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(n, int) and peak < 64 * 1024  # arithmetic only: nothing is allocated
    if name == "llama-65b":
        # The exact count is 65,285,660,672 = 65.29B; the paper truncates it to 65.2B instead of
        # rounding to 65.3B. Allow one unit of the 3rd significant digit (0.1B) for this one.
        assert n == 65_285_660_672
        assert abs(n / 1e9 - PUBLISHED[name]) <= 0.1
    else:
        assert _three_digits(n) == PUBLISHED[name], (name, n)


def test_exact_counts_of_released_checkpoints():
    # Totals of the tensors in Meta's released checkpoints (HF format, untied head).
    assert preset("llama-7b").num_params() == 6_738_415_616
    assert preset("llama-13b").num_params() == 13_015_864_320
    assert preset("llama2-70b").num_params() == 68_976_648_192
    assert preset("llama2-70b").ffn_hidden_size == 28672  # 1.3 * 8/3 * 8192, multiple of 4096


# Llama 3 family: totals of the tensors of the released HF checkpoints (the model cards' 8B, 70B,
# 405B, 1.23B, 3.21B), and the shape details that make them.
LLAMA3 = {"llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
          "llama3.1-70b": 70_553_706_496, "llama3.3-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
          "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824}


@pytest.mark.parametrize("name", list(LLAMA3))
def test_llama3_presets_match_model_cards(name):
    c = preset(name)
    assert c.num_params() == LLAMA3[name], (name, c.num_params())
    assert (c.vocab_size, c.num_kv_heads, c.rope_theta) == (128256, 8, 500000.0)
    assert c.ffn_hidden_size == {"8b": 14336, "70b": 28672, "405b": 53248, "1b": 8192, "3b": 8192}[name.split("-")[1]]
    assert c.tie_embeddings == name.startswith("llama3.2")
    if name.startswith("llama3-"):
        assert c.rope_scaling is None and c.max_seq_len == 8192
    else:
        s = c.rope_scaling
        assert (s.type, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (
            "llama3", 32.0 if name.startswith("llama3.2") else 8.0, 1.0, 4.0, 8192) and c.max_seq_len == 131072


ROPE = "{type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64}"


def test_rope_scaling_from_yaml_override_and_round_trip():
    cfg = load_config(None, ["model.preset=tiny", f"model.rope_scaling={ROPE}"])
    s = cfg.model.rope_scaling
    assert s.type == "llama3" and s.factor == 8.0 and isinstance(s.factor, float)
    assert s.original_max_position_embeddings == 64
    back = config_from_dict(config_to_dict(cfg))  # run.json keeps it
    assert back.model.rope_scaling == s
    assert load_config(None, ["model.preset=llama3.1-8b", "model.rope_scaling=null"]).model.rope_scaling is None


@pytest.mark.parametrize("value, words", [
    ("{type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4}",
     "model.rope_scaling (llama3) lacks original_max_position_embeddings"),
    ("{type: linear}", "model.rope_scaling (linear) lacks factor"),
    ("{type: yarn, factor: 4}", "model.rope_scaling (yarn) lacks original_max_position_embeddings"),
    ("{type: dynamic, factor: 2}", "model.rope_scaling.type='dynamic' is not supported"),
    ("{type: linear, factor: 2, low_freq_factor: 1}", "model.rope_scaling.low_freq_factor is not used by linear"),
    ("{type: linear, factor: 2, scale: 1}", "unknown key model.rope_scaling.scale"),
    ("{type: linear, factor: two}", "model.rope_scaling.factor: expected a number"),
    ("llama3", "model.rope_scaling must be a mapping"),
])
def test_rope_scaling_errors(value, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=tiny", f"model.rope_scaling={value}"])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("params", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
     "original_max_position_embeddings": 100},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
     "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.5},
])
def test_rope_tables_equal_transformers(params):
    """cos/sin tables (fp32) equal transformers' LlamaRotaryEmbedding bitwise for every scaling kind,
    including yarn's attention factor; theta 5e5, head_dim 32, 256 positions (4x the original context)."""
    import torch
    import transformers

    from megatron_llama.config.model import RopeScaling
    from megatron_llama.model.rotary import RotaryEmbedding
    hf_cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5e5, **(params or {})})
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    x = torch.zeros(1, 256, 32)
    cos, sin = hf(x, torch.arange(256)[None])
    scaling = None if params is None else RopeScaling.from_dict(
        {"type": params["rope_type"], **{k: v for k, v in params.items() if k != "rope_type"}})
    ours = RotaryEmbedding(32, 256, 5e5, scaling=scaling)
    assert torch.equal(ours.cos, cos[0]) and torch.equal(ours.sin, sin[0])
    if params is not None:  # the scaling changes the tables: the test would see it dropped
        assert not torch.equal(ours.cos, RotaryEmbedding(32, 256, 5e5).cos)


@settings(max_examples=40, deadline=None)
@given(head_dim=st.sampled_from([2, 4, 8, 16]), kv_heads=st.integers(1, 4), groups=st.integers(1, 3),
       layers=st.integers(1, 3), vocab=st.integers(3, 700), multiple_of=st.sampled_from([1, 8, 32, 256]),
       ffn_mult=st.sampled_from([None, 0.7, 1.3]), qkv_bias=st.booleans(), tied=st.booleans(),
       tp=st.sampled_from([1, 2, 4]))
def test_num_params_equals_hf_model(head_dim, kv_heads, groups, layers, vocab, multiple_of, ffn_mult,
                                    qkv_bias, tied, tp):
    """num_params(tp) == parameters of the HF model of the same shape with the vocab padded for
    tp (HF Qwen2 when qkv_bias: bias on q, k, v). The HF model is built on the meta device."""
    import torch
    import transformers

    from megatron_llama.model.hf_mapping import hf_config_kwargs

    heads = kv_heads * groups
    cfg = ModelConfig(hidden_size=heads * head_dim, num_layers=layers, num_attention_heads=heads,
                      num_kv_heads=kv_heads, vocab_size=vocab, multiple_of=multiple_of,
                      ffn_dim_multiplier=ffn_mult, qkv_bias=qkv_bias, tie_embeddings=tied)
    kwargs = {**hf_config_kwargs(cfg), "vocab_size": cfg.padded_vocab_size(tp)}
    cls = (transformers.Qwen2ForCausalLM, transformers.Qwen2Config) if qkv_bias else \
        (transformers.LlamaForCausalLM, transformers.LlamaConfig)
    with torch.device("meta"):
        hf = cls[0](cls[1](**kwargs))
    assert cfg.num_params(tp) == sum(p.numel() for p in hf.parameters())
