"""FLOP/MFU math, the LR schedule and the optimizer's parameter groups."""
import math

import pytest
import torch

from launch.lr_schedule import lr_multiplier
from megatron_llama.config import preset
from megatron_llama.flops import flops_per_token, mfu, model_tflops_per_gpu, peak_tflops


def test_flops_formula_llama_7b():
    cfg = preset("llama-7b")
    n = cfg.matmul_params()
    assert 6.4e9 < n < 6.8e9  # 6.5B in blocks + 131M LM head
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 32 * 4096 * 2048
    # one H100 at 3000 tokens/s of a 7B model is ~130 TFLOP/s, ~13% MFU
    tf = model_tflops_per_gpu(3000, cfg, 2048, 1)
    assert 120 < tf < 140
    assert mfu(3000, cfg, 2048, 1, peak_tflops("NVIDIA H100 80GB HBM3")) == pytest.approx(tf / 989)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("cpu") is None and mfu(1, cfg, 2048, 1, None) is None


def test_cosine_schedule_warms_up_and_decays_to_ten_percent():
    m = [lr_multiplier(s, total_steps=100, warmup_steps=10, min_ratio=0.1) for s in range(120)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert m[10] == pytest.approx(1.0)
    assert m[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert m[100] == pytest.approx(0.1) and m[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))


def test_no_weight_decay_on_norms_and_biases():
    from pipelines.engine import param_groups
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
