"""The ``mllama-convert`` subcommands (argument parsing is in convert.py)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import torch

from megatron_llama.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, DataConfig, TrainConfig
from megatron_llama.checkpoint.native_weights import open_native, write_native
from megatron_llama.checkpoint.params import param_table
from megatron_llama.data.run_tokenizer import run_tokenizer

from .output_dir import atomic_output, check_output
from .progress import TensorProgress

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VERIFY_AUTO_MAX_PARAMS = 5 * 10 ** 8  # a TP1 fp32 forward of both sides fits a workstation


def run(args) -> int:
    return {"hf-to-native": hf_to_native, "native-to-hf": native_to_hf, "meta-to-native": meta_to_native,
            "inspect": inspect, "verify": verify}[args.command](args)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_layout(cfg: ModelConfig, tp: int, pp: int) -> ParallelConfig:
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1 (got --tp {tp} --pp {pp})")
    par = ParallelConfig(tp=tp, pp=pp)
    try:
        par.check_model(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("parallel.tp", "--tp").replace("parallel.pp", "--pp")) from None
    return par


def _check_tokenizer(path: Optional[str], cfg: ModelConfig) -> Optional[str]:
    if path is None:
        return None
    from megatron_llama.data.tokenizer import Tokenizer
    tok = Tokenizer.load(path)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {path} has {tok.vocab_size} ids but the model's vocabulary has only "
                          f"{cfg.vocab_size} rows: pass the tokenizer the model was trained with")
    return str(Path(path).resolve())


def _boundaries(run_cfg: RunConfig, dtype: torch.dtype) -> Optional[list[int]]:
    if run_cfg.parallel.pp == 1:
        return None
    from pipelines.balance import stage_boundaries
    return stage_boundaries(run_cfg.model, run_cfg.parallel, dp=1, seq_len=run_cfg.data.seq_len,
                            micro_batch_size=1, bf16=dtype == torch.bfloat16)


def _nbytes(cfg: ModelConfig, tp: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(size * int(torch.Size(p.shape).numel()) for p in param_table(cfg, tp))


def _write_converted(args, run_cfg: RunConfig, layers, dtype: torch.dtype, source: str) -> None:
    """Shared tail of hf-to-native and meta-to-native: progress, atomic write, verify."""
    tp, pp = run_cfg.parallel.tp, run_cfg.parallel.pp
    bar = TensorProgress(_nbytes(run_cfg.model, tp, dtype), f"writing TP{tp}·PP{pp}", enabled=not args.no_progress)
    with atomic_output(args.out, args.force) as tmp:
        write_native(tmp, run_cfg, layers, tp, pp, boundaries=_boundaries(run_cfg, dtype), dtype=dtype,
                     source=source, on_layer=lambda name, t: bar.update(t, dtype))
        stats = bar.close()
    _say(f"wrote {args.out}: {run_cfg.model.num_params(tp) / 1e6:.1f}M parameters at TP{tp}·PP{pp} "
         f"({str(dtype).replace('torch.', '')}), {stats['tensors']} tensors, {stats['bytes'] / 1e9:.2f} GB in "
         f"{stats['seconds']:.1f} s ({stats['gb_per_s']:.2f} GB/s); start a run from it with "
         f"train.init_from={args.out}")


def hf_to_native(args) -> int:
    from megatron_llama.checkpoint.hf_source import HFWeights, check_hf_keys, hf_layers, hf_model_config
    check_output(Path(args.out), args.force)
    cfg = hf_model_config(args.hf_dir)
    par = _check_layout(cfg, args.tp, args.pp)
    weights = HFWeights(args.hf_dir)
    check_hf_keys(weights, cfg)
    tok = args.tokenizer or (str(Path(args.hf_dir) / "tokenizer.model")
                             if (Path(args.hf_dir) / "tokenizer.model").is_file() else None)
    # a sequence classifier becomes a reward-model checkpoint (train.objective=reward goes with model.head=score)
    run_cfg = RunConfig(model=cfg, parallel=par, data=DataConfig(tokenizer=_check_tokenizer(tok, cfg)),
                        train=TrainConfig(objective="reward" if cfg.head == "score" else "lm"))
    first = weights.get(next(iter(sorted(weights.names))))
    dtype = DTYPES[args.dtype] if args.dtype else first.dtype
    _write_converted(args, run_cfg, hf_layers(weights, cfg, args.tp, dtype), dtype, f"hf:{Path(args.hf_dir).resolve()}")
    if _should_verify(args, cfg):
        return _verify_paths(args.hf_dir, args.out, tolerance=_tolerance(dtype))
    return 0


def meta_to_native(args) -> int:
    from .meta import MetaCheckpoint
    check_output(Path(args.out), args.force)
    meta = MetaCheckpoint(args.meta_dir, vocab_size=args.vocab_size)
    cfg = meta.config
    par = _check_layout(cfg, args.tp, args.pp)
    run_cfg = RunConfig(model=cfg, parallel=par, data=DataConfig(tokenizer=_check_tokenizer(args.tokenizer, cfg)))
    dtype = DTYPES[args.dtype] if args.dtype else meta.dtype
    _write_converted(args, run_cfg, meta.layers(args.tp, dtype), dtype, f"meta:{Path(args.meta_dir).resolve()}")
    return 0


def chat_entries(config: RunConfig) -> Optional[dict]:
    """A fine-tuned chat model's tokenizer_config.json entries: the chat template it was trained with
    (SFT, and the preference objectives, whose pairs are rendered with it)."""
    if not (config.data.sft or config.preference):
        return None
    from megatron_llama.data.chat_template import chat_template
    return chat_template(config.data.chat_template).hf_tokenizer_config()


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: write a size such as 2GB or 500MB")
    return int(float(m.group(1)) * 1000 ** "BKMGT".index(m.group(2) or "B"))


def native_to_hf(args) -> int:
    from .hf_export import write_hf, write_tokenizer
    check_output(Path(args.out), args.force)
    ck = open_native(args.checkpoint)
    cfg = ck.model
    dtype = DTYPES[args.dtype]
    try:
        from megatron_llama.checkpoint import optimizer_state  # comes with `mllama-convert reshard`
    except ImportError:
        optimizer_state = None
    if args.weights is None:  # masters when this version can read them and the checkpoint has them
        has_masters = not ck.meta.get("weights_only") and ck.config.parallel.zero_stage in (1, 2)
        args.weights = "masters" if optimizer_state is not None and has_masters else "module"
    if args.weights == "masters":
        if optimizer_state is None:
            raise ConfigError("--weights masters is not available in this version yet (it comes with "
                              "`mllama-convert reshard`): use --weights module")
        if ck.meta.get("weights_only"):
            raise ConfigError(f"{ck.path} is a weights-only checkpoint (no optimizer state, no fp32 masters): "
                              "use --weights module")
        layers = optimizer_state.master_layers(ck, dtype)
    else:
        layers = ck.layers()
    tok = args.tokenizer or run_tokenizer(ck.config)
    tok = _check_tokenizer(tok, cfg) if tok else None
    shard_bytes = _parse_size(args.max_shard_size)
    bar = TensorProgress(sum(s.numel() for s in [torch.Size(p.shape) for p in param_table(cfg)])
                         * torch.empty((), dtype=dtype).element_size(), "exporting to HF",
                         enabled=not args.no_progress)
    with atomic_output(args.out, args.force) as tmp:
        write_hf(tmp, cfg, layers, dtype, shard_bytes, on_layer=lambda name, t: bar.update(t, dtype))
        stats = bar.close()
        described = write_tokenizer(tmp, tok, cfg.max_seq_len, chat_entries(ck.config))
    _say(f"wrote {args.out} from {ck.path} (step {ck.step}, TP{ck.tp}·PP{ck.pp}·DP{ck.dp}, {args.weights} "
         f"weights as {args.dtype}): {stats['tensors']} tensors, {stats['bytes'] / 1e9:.2f} GB in "
         f"{stats['seconds']:.1f} s ({stats['gb_per_s']:.2f} GB/s)")
    _say(f"  tokenizer: {described}" if described else
         "  tokenizer: none recorded for this run (synthetic data?): pass --tokenizer tokenizer.model to include one")
    if _should_verify(args, cfg):
        return _verify_paths(str(ck.path), args.out, tolerance=_tolerance(dtype, ck))
    return 0


def _should_verify(args, cfg: ModelConfig) -> bool:
    return args.verify == "yes" or (args.verify == "auto" and cfg.num_params() < VERIFY_AUTO_MAX_PARAMS)


def _tolerance(dtype: torch.dtype, ck=None) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2


def _verify_paths(a: str, b: str, tolerance: Optional[float], tokens: int = 32) -> int:
    from .verify import compare
    report = compare(a, b, tokens)
    _say(report.describe())
    if tolerance is not None and report.max_rel > tolerance:
        _say(f"error: logits of {a} and {b} differ by {report.max_rel:.2e} (relative) > {tolerance:.0e}")
        return 1
    return 0


def verify(args) -> int:
    return _verify_paths(args.a, args.b, args.tolerance, args.tokens)


def inspect(args) -> int:
    from .inspect_dir import describe
    print(describe(args.dir, tensors=args.tensors))
    return 0
