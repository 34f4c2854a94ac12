"""``mllama-rs``: one round of rejection-sampling fine-tuning data (Llama 2, section 3.2.3).

For every prompt of a prompt set: sample K answers from a policy, score each with a reward
model, keep the best, and write it as an SFT record (``{"messages": [..., {"role": "assistant",
"content": BEST}], "reward": r, "prompt_index": i}``), which ``data.sft: true`` reads as it is.

* Policy: a native checkpoint (run directory or step directory) or an exported Hugging Face
  directory. Generation is ``transformers.generate`` on CPU (a native checkpoint is mapped to a
  ``LlamaForCausalLM`` in memory, model/hf_mapping.py); ``--engine vllm`` (or ``auto`` on a GPU
  with vLLM installed) uses vLLM on an exported directory instead.
* Reward model: ours (a native ``train.objective=reward`` checkpoint) or an exported
  ``LlamaForSequenceClassification``; both are scored by ``transformers`` (the native one mapped in
  memory), on the conversation rendered with the chat template, the score of its last token.
* Deterministic: prompt ``i``'s samples are drawn from a generator seeded by ``(--seed, i)``, so the
  output does not depend on batching or on where a run was resumed.
* Resumable by prompt index: records are appended (and flushed) to ``OUT.partial`` one prompt at
  a time, beside ``OUT.partial.json`` (the settings); a rerun with the same settings continues
  after the last complete record; the finished file is renamed to ``OUT`` at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_llama.config import ConfigError

EPILOG = """examples:
  mllama-rs --prompts data/instructions.jsonl --policy runs/sft-tiny-cpu --reward runs/reward-tiny-cpu \\
            --k 4 --output runs/rs/round1.jsonl
  mllama-rs --prompts prompts.jsonl --policy hf/llama-sft --reward hf/llama-rm --k 8 --temperature 0.8 \\
            --limit 1000 --output rs.jsonl --engine vllm
then fine-tune on it:  mllama-train configs/sft-tiny-cpu.yaml data.corpus=runs/rs/round1.jsonl

prompts (JSONL, one per line): {"prompt": "...", "system": "..."?} or {"messages": [...]} ending with a
user turn; SFT records also work (their last answer is dropped). An interrupted run (Ctrl-C, a
killed job) resumes where it stopped when started again with the same arguments.
"""


def _is_hf(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def _prompt_of(line: bytes) -> tuple[Optional[list], Optional[str]]:
    """The conversation to answer (ending with a user turn), or the reason the line is unusable."""
    from megatron_llama.data.jsonl import parse_object
    obj, reason = parse_object(line)
    if obj is None:
        return None, reason
    if "messages" in obj and isinstance(obj["messages"], list):
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in obj["messages"]
                    if isinstance(m, dict)]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # an SFT record: answer its last question afresh
    elif isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
        if obj.get("system") is not None:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    else:
        return None, "unknown record shape: neither 'messages' nor 'prompt'"
    if not messages or messages[-1]["role"] != "user":
        return None, "the conversation does not end with a user turn"
    return messages, None


def _hf_config(cfg, tok, classifier: bool):
    import transformers

    from megatron_llama.model.hf_mapping import hf_config_kwargs
    if cfg.embedding_layernorm:
        raise ConfigError("model.embedding_layernorm=true has no transformers equivalent: this model cannot be run")
    extra = dict(num_labels=1, pad_token_id=tok.unk_id) if classifier else dict(pad_token_id=tok.eos_id)
    return transformers.LlamaConfig(**hf_config_kwargs(cfg), hidden_act="silu", attention_bias=cfg.qkv_bias,
                                    mlp_bias=False, head_dim=cfg.head_dim, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, **extra)


def load_model(path: str, classifier: bool, tokenizer: Optional[str]):
    """(transformers model in fp32 eval mode, our Tokenizer, chat template name) for ``path``."""
    import torch
    import transformers

    from megatron_llama.data.tokenizer import Tokenizer
    what = "--reward" if classifier else "--policy"
    if _is_hf(path):
        tok_path = tokenizer or str(Path(path) / "tokenizer.model")
        if not Path(tok_path).is_file():
            raise ConfigError(f"{what} {path} has no tokenizer.model: pass --tokenizer")
        conf = json.loads((Path(path) / "config.json").read_text())
        is_classifier = (conf.get("architectures") or [""])[0].endswith("ForSequenceClassification")
        if is_classifier != classifier:
            raise ConfigError(f"{what} {path} is {'a reward model' if is_classifier else 'a causal LM'}: pass "
                              f"{'a reward model' if classifier else 'a policy (SFT) model'}")
        auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=torch.float32)
        template = "llama2"
    else:
        from megatron_llama.checkpoint.native_weights import open_native
        from megatron_llama.data.run_tokenizer import run_tokenizer
        from megatron_llama.model.hf_mapping import native_to_hf
        ck = open_native(path)
        if (ck.model.head == "score") != classifier:
            raise ConfigError(f"{what} {path} is {'a reward model' if ck.model.head == 'score' else 'a causal LM'}: "
                              f"pass {'a reward model' if classifier else 'a policy (SFT) model'}")
        tok_path = tokenizer or run_tokenizer(ck.config)
        if tok_path is None:
            raise ConfigError(f"{what} {path}: no tokenizer recorded for this run: pass --tokenizer")
        tok = Tokenizer.load(tok_path)
        full = {k: t.float() for _, layer in ck.layers(pad_for_tp=1) for k, t in layer.items()}
        conf = _hf_config(ck.model, tok, classifier)
        cls = transformers.LlamaForSequenceClassification if classifier else transformers.LlamaForCausalLM
        model = cls(conf)
        missing = model.load_state_dict(native_to_hf(full, ck.model), strict=False)
        if [k for k in missing.missing_keys if not k.endswith("inv_freq")] or missing.unexpected_keys:
            raise ConfigError(f"{what} {path}: its weights do not map onto {cls.__name__} ({missing})")
        template = ck.config.data.chat_template
    model.eval()
    return model, Tokenizer.load(tok_path), template


class Sampler:
    """K answers per conversation from a policy (transformers on CPU, or vLLM)."""

    def __init__(self, policy: str, tokenizer: Optional[str], engine: str, k: int, temperature: float,
                 top_p: float, max_new_tokens: int, seed: int):
        from megatron_llama.data.chat_template import chat_template
        self.k, self.temperature, self.top_p, self.max_new, self.seed = k, temperature, top_p, max_new_tokens, seed
        self.engine = _pick_engine(engine, policy)
        if self.engine == "vllm":
            import vllm
            from megatron_llama.data.tokenizer import Tokenizer
            self.tok = Tokenizer.load(tokenizer or str(Path(policy) / "tokenizer.model"))
            self.template = chat_template("llama2")
            self.llm = vllm.LLM(model=policy, seed=seed, dtype="auto")
        else:
            self.model, self.tok, name = load_model(policy, classifier=False, tokenizer=tokenizer)
            self.template = chat_template(name)

    def answers(self, messages: list, index: int) -> list[str]:
        import torch
        ids = self.template.encode_prompt(messages, self.tok)
        seed = _prompt_seed(self.seed, index)
        if self.engine == "vllm":
            import vllm
            params = vllm.SamplingParams(n=self.k, temperature=self.temperature, top_p=self.top_p,
                                         max_tokens=self.max_new, seed=seed, stop_token_ids=[self.tok.eos_id])
            out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
            return [self.tok.decode(c.token_ids).strip() for c in out.outputs]
        torch.manual_seed(seed)
        with torch.no_grad():
            gen = self.model.generate(torch.tensor([ids]), do_sample=True, temperature=self.temperature,
                                      top_p=self.top_p, max_new_tokens=self.max_new, num_return_sequences=self.k,
                                      eos_token_id=self.tok.eos_id, pad_token_id=self.tok.eos_id)
        out = []
        for row in gen[:, len(ids):].tolist():
            if self.tok.eos_id in row:
                row = row[:row.index(self.tok.eos_id)]
            out.append(self.tok.decode(row).strip())
        return out


def _pick_engine(engine: str, policy: str) -> str:
    if engine == "transformers":
        return engine
    try:
        import torch
        import vllm  # noqa: F401  (optional: only on GPU machines)
        has_vllm = torch.cuda.is_available()
    except ImportError:
        has_vllm = False
    if engine == "vllm":
        if not has_vllm:
            raise ConfigError("--engine vllm needs vLLM installed and a GPU: use --engine transformers (CPU)")
        if not _is_hf(policy):
            raise ConfigError("--engine vllm reads a Hugging Face directory: export the policy first "
                              "(mllama-convert native-to-hf) or use --engine transformers")
        return engine
    return "vllm" if has_vllm and _is_hf(policy) else "transformers"


class Scorer:
    """Rewards of answers to a conversation: the reward model's score of each rendered conversation."""

    def __init__(self, reward: str, tokenizer: Optional[str]):
        from megatron_llama.data.chat_template import chat_template
        self.model, self.tok, name = load_model(reward, classifier=True, tokenizer=tokenizer)
        self.template = chat_template(name)
        self.pad = self.model.config.pad_token_id

    def scores(self, messages: list, answers: list[str]) -> list[float]:
        import torch

        from megatron_llama.data.chat_template import TemplateError
        seqs, usable = [], []
        for a in answers:
            try:
                seqs.append(self.template.encode(messages + [{"role": "assistant", "content": a}], self.tok)[0])
                usable.append(True)
            except TemplateError:  # an empty answer, or one with template markup: never the best
                usable.append(False)
        out = iter([])
        if seqs:
            s = max(map(len, seqs))
            batch = torch.full((len(seqs), s), self.pad, dtype=torch.long)
            attn = torch.zeros_like(batch)
            for i, ids in enumerate(seqs):
                batch[i, :len(ids)], attn[i, :len(ids)] = torch.tensor(ids), 1
            with torch.no_grad():
                out = iter(self.model(input_ids=batch, attention_mask=attn).logits.squeeze(-1).tolist())
        return [next(out) if ok else float("-inf") for ok in usable]


def _prompt_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _settings(args) -> dict:
    h = hashlib.sha256(Path(args.prompts).read_bytes()).hexdigest()[:16]
    return {"prompts": str(Path(args.prompts).resolve()), "prompts_sha256": h, "policy": str(Path(args.policy).resolve()),
            "reward": str(Path(args.reward).resolve()), "k": args.k, "seed": args.seed,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "limit": args.limit}


def _resume(partial: Path, meta: Path, settings: dict) -> int:
    """Complete records already in ``partial`` (a torn last line is cut off); 0 for a fresh start."""
    if not partial.exists():
        meta.write_text(json.dumps(settings, indent=2) + "\n")
        partial.write_bytes(b"")
        return 0
    old = json.loads(meta.read_text()) if meta.is_file() else None
    if old != settings:
        raise ConfigError(f"{partial} is an interrupted run with other settings ({meta}): rerun with the same "
                          "arguments to resume it, or delete both files to start afresh")
    data = partial.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        partial.write_bytes(keep)
    return keep.count(b"\n")


def rejection_sample(args) -> dict:
    from tqdm import tqdm

    from megatron_llama.data.jsonl import iter_lines
    out = Path(args.output)
    partial, meta = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    lines = [line for line in iter_lines(args.prompts) if line.strip()]  # prompt i = the i-th non-blank line
    if args.limit:
        lines = lines[:args.limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(partial, meta, _settings(args))
    if args.quiet:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    sampler = Sampler(args.policy, args.tokenizer, args.engine, args.k, args.temperature, args.top_p,
                      args.max_new_tokens, args.seed)
    scorer = Scorer(args.reward, args.reward_tokenizer or args.tokenizer)
    with open(partial, "ab") as f, tqdm(total=len(lines), initial=done, desc="mllama-rs", unit=" prompts",
                                        disable=args.quiet) as bar:
        for index in range(done, len(lines)):
            messages, reason = _prompt_of(lines[index])
            record = {"prompt_index": index}
            if messages is None:
                record["skipped"] = reason  # kept in place so indices stay the resume position
            else:
                answers = sampler.answers(messages, index)
                scores = scorer.scores(messages, answers)
                best = max(range(len(answers)), key=lambda j: scores[j])
                if scores[best] == float("-inf"):
                    record["skipped"] = "no usable answer among the samples"
                else:
                    record.update(messages=messages + [{"role": "assistant", "content": answers[best]}],
                                  reward=scores[best], rewards=scores)
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
            if args.stop_after and index + 1 - done >= args.stop_after:  # tests: an interruption
                return {"interrupted_at": index + 1}
    # the finished dataset: only the kept records (skipped prompts are reported, not written)
    kept = 0
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with open(partial, "rb") as src, open(tmp, "wb") as dst:
        for line in src:
            if "messages" in json.loads(line):
                dst.write(line)
                kept += 1
    os.replace(tmp, out)
    partial.unlink()
    meta.unlink()
    return {"prompts": len(lines), "written": kept, "skipped": len(lines) - kept, "resumed_at": done}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="mllama-rs", description=__doc__.split("\n")[0].replace("``", ""),
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="JSONL prompt set (prompt / messages records)")
    ap.add_argument("--policy", required=True, help="policy: native checkpoint or exported HF directory")
    ap.add_argument("--reward", required=True, help="reward model: native reward checkpoint or exported HF directory")
    ap.add_argument("--output", required=True, help="SFT JSONL to write (OUT.partial while running)")
    ap.add_argument("--k", type=int, default=4, help="answers sampled per prompt (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    ap.add_argument("--engine", choices=("auto", "transformers", "vllm"), default="auto",
                    help="generation engine (auto: vLLM on a GPU when installed, else transformers)")
    ap.add_argument("--tokenizer", help="the policy's tokenizer.model when its checkpoint does not record one")
    ap.add_argument("--reward-tokenizer", help="the reward model's tokenizer.model (default: --tokenizer / recorded)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate an interruption
    args = ap.parse_args(argv)
    try:
        if args.k < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
            raise ConfigError("--k and --max-new-tokens must be >= 1, --temperature > 0 and --top-p in (0, 1]")
        if not Path(args.prompts).is_file():
            raise ConfigError(f"--prompts {args.prompts} does not exist: pass a JSONL prompt set")
        for flag, path in (("--policy", args.policy), ("--reward", args.reward)):
            if not Path(path).exists():
                raise ConfigError(f"{flag} {path} does not exist: pass a native checkpoint or an HF directory")
        result = rejection_sample(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume ({args.output}.partial)", file=sys.stderr)
        return 130
    if "interrupted_at" in result:
        print(f"stopped after prompt {result['interrupted_at']} (--stop-after): rerun to resume", file=sys.stderr)
        return 0
    print(f"wrote {args.output}: {result['written']:,} SFT records (best of {args.k} per prompt) for "
          f"{result['prompts']:,} prompts, {result['skipped']:,} skipped"
          + (f"; resumed at prompt {result['resumed_at']}" if result["resumed_at"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
