"""train.precision=fp8: the config edge, and the float8 local matmul inside megatron-core's TP layers.

torch._scaled_mm runs on the CPU too, so the wiring and the numerics are tested here with real
megatron-core ColumnParallelLinear / RowParallelLinear layers on gloo TP groups; the GPU numbers
(speed, 300-step loss curves) come from bench/fp8_check.py (bench/results/).

Relative error is ||fp8 - ref|| / ||ref|| against the same layer with its bf16 matmul, computed in
float64. Float8 e4m3 keeps 3 mantissa bits (e5m2 for tensorwise gradients: 2); the pair of layers
puts two float8 GEMMs in sequence, so errors of 3-9 % are float8's own (measured on CPU: output
5.3 %, input grad 8.9 %, weight grads 7-9 %, tensorwise TP 1); a wrong transpose or scale gives
~100 %. Bounds: 8 % on the output, 12 % on the gradients.
"""
from __future__ import annotations

import pytest
import torch

from megatron_llama.config import ConfigError, load_config

TOL_OUT, TOL_GRAD = 0.08, 0.12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def test_fp8_config_and_cpu_refusal(capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.fp8_recipe='blockwise': choose one of tensorwise, rowwise"):
        load_config(None, ["model.preset=tiny", "train.precision=fp8", "train.fp8_recipe=blockwise"])
    assert load_config(None, ["model.preset=tiny", "train.precision=fp8",
                              "train.fp8_recipe=rowwise"]).train.fp8_recipe == "rowwise"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("this machine supports fp8; the refusal is for CPUs and pre-Hopper GPUs")
    from launch.train import main
    monkeypatch.delenv("RANK", raising=False)
    assert main(["configs/tiny-cpu-3d.yaml", "train.precision=fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.precision=fp8 needs an NVIDIA Hopper"), err


def _layers_check(rank, world, recipe):
    """A column-parallel -> row-parallel pair (the MLP's shape) at TP=world, bf16 vs fp8.
    Returns (output error, input-grad error, weight-grad errors) against the bf16 layers."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_llama.config import ParallelConfig
    from megatron_llama.model import fp8
    from megatron_llama.model.tp_config import megatron_config

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    mp = megatron_config(ParallelConfig(tp=world), torch.bfloat16, torch.device("cpu"))
    d, f, tokens = 64, 128, 48
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(f, d, generator=g) / d ** 0.5
    w2 = torch.randn(d, f, generator=g) / f ** 0.5
    x0 = torch.randn(tokens // 2, 2, d, generator=g)
    dy = torch.randn(tokens // 2, 2, d, generator=g)

    def run(use_fp8: bool):
        col = ColumnParallelLinear(d, f, config=mp, init_method=lambda w: w, bias=False, gather_output=False,
                                   tp_group=group)
        row = RowParallelLinear(f, d, config=mp, init_method=lambda w: w, bias=False, input_is_parallel=True,
                                skip_bias_add=False, tp_group=group)
        with torch.no_grad():
            col.weight.copy_(w1.chunk(world, 0)[rank])
            row.weight.copy_(w2.chunk(world, 1)[rank])
        model = torch.nn.ModuleDict(dict(col=col, row=row))
        if use_fp8:
            assert fp8.convert(model, recipe) == 2
        x = x0.clone().bfloat16().requires_grad_()
        y, _ = row(torch.nn.functional.gelu(col(x)[0]))
        y.backward(dy.bfloat16())
        return y, x.grad, col.weight.grad, row.weight.grad

    ref, out = run(False), run(True)
    errs = [rel_err(o, r) for o, r in zip(out, ref)]
    # every TP rank sees the same all-reduced output and input gradient
    y = out[0].float().contiguous()
    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(ys, y, group=group)
    assert all(torch.equal(ys[0], t) for t in ys)
    return errs


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_tp_layers_match_bf16(dist_pool, recipe):
    for world in (1, 2):
        for rank, (e_out, e_dx, e_dw1, e_dw2) in enumerate(dist_pool(world).run(_layers_check, recipe)):
            print(f"{recipe} TP{world} rank {rank}: out {e_out:.4f} dx {e_dx:.4f} dw {e_dw1:.4f} {e_dw2:.4f}")
            assert e_out < TOL_OUT and e_dx < TOL_GRAD, (e_out, e_dx)
            assert e_dw1 < TOL_GRAD and e_dw2 < TOL_GRAD, (e_dw1, e_dw2)
            assert min(e_out, e_dx, e_dw1, e_dw2) > 0  # float8 really ran (bf16 would be exact)


def test_fp8_keeps_lm_head_and_tp_layers(single_process_model_parallel):
    """convert() changes the blocks' local matmuls only, never the layer objects or the LM head."""
    from megatron_llama.config import ParallelConfig, preset
    from megatron_llama.model import LlamaModel, LMHead, fp8

    model = LlamaModel(preset("tiny"), ParallelConfig(), dtype=torch.bfloat16)
    before = {n: type(m) for n, m in model.named_modules()}
    n = fp8.convert(model, "tensorwise", skip=(LMHead,))
    assert n == 4 * model.cfg.num_layers  # qkv, proj, gate_up, down per block
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not isinstance(vars(model.head.output).get("_forward_impl"), fp8.Float8LinearImpl)  # head stays bf16
    assert isinstance(vars(model.layers[0].mlp.down)["_forward_impl"], fp8.Float8LinearImpl)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    model.loss(tokens, tokens).backward()
    assert all(p.grad is not None for p in model.parameters())
