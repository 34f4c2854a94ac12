"""``mllama-convert inspect DIR``: what a checkpoint directory holds, read from metadata only.

Native checkpoints: ``run.json`` (layout, step, tokens consumed, config), the parameter table
(shape, TP split) and dtypes from one memory-mapped shard (no tensor data is read); whether
DeepSpeed universal-checkpoint metadata is present. Stores of ``mllama-convert reshard``: their
``run.json``, trainer state and safetensors headers. HF directories: config.json and the
safetensors headers. Meta directories: params.json and the shard names.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_llama.config import ConfigError


def describe(path: str, tensors: bool = False) -> str:
    p = Path(path)
    if (p / "config.json").is_file():
        return _describe_hf(p, tensors)
    if (p / "params.json").is_file():
        return _describe_meta(p)
    from megatron_llama.checkpoint.resharded import resharded_step_dir
    store = resharded_step_dir(p) if p.exists() else None
    if store is not None:
        return _describe_resharded(store, tensors)
    return _describe_native(p, tensors)


def _describe_resharded(step_dir: Path, tensors: bool) -> str:
    """A store of ``mllama-convert reshard``: the layout it was written for, where it came from,
    and (safetensors headers only) every parameter's master and moments."""
    from safetensors import safe_open

    from megatron_llama.checkpoint.directory import META
    from megatron_llama.checkpoint.optimizer_state import STATE_KEYS
    from megatron_llama.checkpoint.params import param_table
    from megatron_llama.checkpoint.resharded import TRAINER_STATE, layer_file, store_key
    from megatron_llama.config import config_from_dict
    try:
        meta = json.loads((step_dir / META).read_text())
        config = config_from_dict(meta["config"])
        state = json.loads((step_dir / TRAINER_STATE).read_text())
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{step_dir} is a damaged resharded store ({type(e).__name__}: {e!s:.80}): reshard again") from None
    m, lay, src = config.model, meta["layout"], meta.get("resharded_from", {})
    seq, consumed = config.data.seq_len, int(meta.get("consumed_samples", 0))
    rows, headers = param_table(m, 1), {}
    for layer in sorted({r.layer for r in rows}):
        path = step_dir / layer_file(layer)
        if not path.is_file():
            raise ConfigError(f"resharded store {step_dir} has no {path.name}: reshard again")
        with safe_open(str(path), framework="pt") as f:
            headers.update({k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()})
    missing = [store_key(k, r.name) for r in rows for k in STATE_KEYS if store_key(k, r.name) not in headers]
    if missing:
        raise ConfigError(f"resharded store {step_dir} lacks {len(missing)} tensor(s), e.g. {missing[0]}: reshard again")
    dtypes = sorted({d for _, d in headers.values()})
    lines = [f"{step_dir}: resharded store (mllama-convert reshard: fp32 masters, Adam moments, step count; "
             f"train.save_dir={step_dir.parent} resumes it, train.init_from={step_dir.parent} takes its masters)",
             f"  layout    written for TP{lay['tp']}·PP{lay['pp']}·DP{lay['dp']}, ZeRO-{config.parallel.zero_stage}"
             + (f"; from TP{src['tp']}·PP{src['pp']}·DP{src['dp']} {src.get('path', '')}" if src else ""),
             f"  step      {meta.get('step')}, {consumed} samples = {consumed * seq:,} tokens consumed (seq_len {seq}), "
             f"optimizer step {state.get('optimizer_step')}",
             f"  model     {m.name}: d={m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads / "
             f"{m.num_kv_heads} KV heads, ffn {m.ffn_hidden_size}, {m.num_params() / 1e6:.1f}M parameters, "
             f"tied={m.tie_embeddings}, qkv_bias={m.qkv_bias}",
             f"  vocab     {m.vocab_size} (stored unpadded)",
             f"  dtype     {', '.join(dtypes)} ({len(rows)} parameters x {', '.join(STATE_KEYS)})",
             f"  tokenizer {_tokenizer_line(config)}"]
    if tensors:
        lines.append(f"  {'parameter':44s} {'stored shape':>16s}  split")
        for r in rows:
            lines.append(f"  {r.name:44s} {str(list(headers[store_key(STATE_KEYS[0], r.name)][0])):>16s}  {r.split}")
    return "\n".join(lines)


def _describe_native(p: Path, tensors: bool) -> str:
    from megatron_llama.checkpoint.native_weights import open_native, torch_load, layer_file, mp_rank_file
    ck = open_native(p)
    m, meta = ck.model, ck.meta
    seq = ck.config.data.seq_len
    consumed = int(meta.get("consumed_samples", 0))
    shard = torch_load(ck.path / (layer_file(1, 0) if ck.per_layer_files else mp_rank_file(0, 0, ck.tp)), str(ck.path))
    state = shard if ck.per_layer_files else (shard.get("module") or {})
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if hasattr(t, "dtype")})
    universal = any((ck.path / d).is_dir() for d in ("zero", "universal")) or bool(meta.get("universal"))
    lines = [f"{ck.path}: native checkpoint ({'weights only' if meta.get('weights_only') else 'full training state'}"
             f"{', from ' + meta['source'] if meta.get('source') else ''})",
             f"  layout    TP{ck.tp}·PP{ck.pp}·DP{ck.dp}, ZeRO-{ck.config.parallel.zero_stage}, "
             f"{'PipelineModule layer files' if ck.per_layer_files else 'PP=1 module files'}",
             f"  step      {ck.step}, {consumed} samples = {consumed * seq:,} tokens consumed (seq_len {seq})",
             f"  model     {m.name}: d={m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads / "
             f"{m.num_kv_heads} KV heads, ffn {m.ffn_hidden_size}, {m.num_params() / 1e6:.1f}M parameters, "
             f"tied={m.tie_embeddings}, qkv_bias={m.qkv_bias}",
             f"  vocab     {m.vocab_size} (padded to {m.padded_vocab_size(ck.tp)} for TP{ck.tp})",
             f"  dtype     {', '.join(dtypes) or '?'}",
             f"  tokenizer {_tokenizer_line(ck.config)}",
             f"  universal checkpoint metadata: {'yes' if universal else 'no'}"]
    if tensors:
        lines.append(f"  {'parameter':44s} {'full shape':>16s}  split       pipeline name")
        for row in ck.table:
            lines.append(f"  {row.name:44s} {str(list(row.shape)):>16s}  {row.split:10s}  {row.pipe_name}")
    return "\n".join(lines)


def _tokenizer_line(config) -> str:
    """The tokenizer.model the run used (what native-to-hf exports), never its corpus."""
    from megatron_llama.data.run_tokenizer import run_tokenizer
    data = config.data
    found = run_tokenizer(config)
    if found and not data.tokenizer:
        return f"{found} (trained from {data.corpus})"
    if found:
        return found
    if data.corpus:
        return (f"none found: the run trained one from {data.corpus} into {data.cache_dir}, which no longer "
                "holds it (native-to-hf --tokenizer FILE exports another)")
    return "none recorded (synthetic data?)"


def _describe_hf(p: Path, tensors: bool) -> str:
    from megatron_llama.checkpoint.hf_source import HFWeights, hf_model_config
    cfg = hf_model_config(p)
    w = HFWeights(p)
    files = sorted({f.name for f in w.where.values()})
    lines = [f"{p}: Hugging Face {json.loads((p / 'config.json').read_text()).get('architectures', ['?'])[0]}",
             f"  model     d={cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_attention_heads} heads / "
             f"{cfg.num_kv_heads} KV heads, ffn {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}, "
             f"{cfg.num_params() / 1e6:.1f}M parameters, tied={cfg.tie_embeddings}, qkv_bias={cfg.qkv_bias}",
             f"  files     {len(files)} ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}), {len(w.names)} tensors",
             f"  tokenizer {'tokenizer.model' if (p / 'tokenizer.model').is_file() else 'no tokenizer.model'}"]
    if tensors:
        for name in sorted(w.names):
            f = w.where[name]
            if f.suffix == ".safetensors":
                s = w._handle(f).get_slice(name)
                lines.append(f"  {name:52s} {str(s.get_shape()):>16s} {s.get_dtype()}  {f.name}")
            else:
                lines.append(f"  {name:52s} {f.name}")
    return "\n".join(lines)


def _describe_meta(p: Path) -> str:
    try:
        params = json.loads((p / "params.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{p}/params.json is not valid JSON ({e})") from None
    shards = sorted(x.name for x in p.glob("consolidated.*.pth"))
    return "\n".join([f"{p}: Meta checkpoint", f"  params    {json.dumps(params)}",
                      f"  shards    {len(shards)} ({', '.join(shards[:4])})"])
