"""Our model behind lm-eval's ``LM`` interface (``TemplateLM``): runs on rank 0, scores through
:class:`launch.eval_ranks.SharedForward`, so every batch is one collective forward of all ranks.

Tokenization follows lm-eval's Hugging Face backend for a LLaMA tokenizer (``add_bos_token``):
``tok_encode`` prepends BOS unless asked not to, a (context, continuation) pair is encoded whole
and split after the context's tokens (``TemplateLM._encode_pair``), an empty context is the
prefix token. So the same checkpoint, exported, gives the same requests to both backends.

* ``loglikelihood``: sum of log p over the continuation's tokens, and whether each of them is
  the greedy token (exact; sequences longer than ``max_length`` + 1 lose tokens on the left).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens over the
  document's tokens, after one prefix (BOS) token, as the ``LM`` contract says. (lm-eval 0.4.13's
  hf backend lets the tokenizer add a BOS to the document as well, so it scores the document after
  two BOS tokens, and the BOS too: its perplexities differ from these.)
* ``generate_until``: greedy only (``do_sample: true`` or a temperature > 0 is refused), up to
  ``max_gen_toks`` tokens, stopping at EOS or any ``until`` string. There is no KV cache: each
  new token is a forward pass over the whole batch (fine for short answers; O(n^2) in length).
"""
from __future__ import annotations

from typing import Callable

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from megatron_llama.config import ConfigError

Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GenerationRefused(ConfigError):
    """A task asks for something greedy decoding cannot give (sampling)."""


class NativeLM(TemplateLM):
    """``score(tokens, targets) -> (log p [b, s], greedy [b, s])``; ``tokenizer``: megatron_llama's
    ``Tokenizer`` interface (``encode`` / ``decode`` / ``bos_id`` / ``eos_id``)."""

    def __init__(self, score: Scorer, tokenizer, max_length: int, batch_size: int = 16, max_gen_toks: int = 256,
                 progress: bool = True):
        super().__init__()
        self.score, self.tok = score, tokenizer
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self.progress = progress

    # --- tokenization -----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        if add_special_tokens is not False and self.tok.bos_id >= 0:
            ids = [self.tok.bos_id] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "path", "mllama")

    # --- scoring ----------------------------------------------------------------------------------
    def _batches(self, items: list, desc: str):
        bar = tqdm(total=len(items), desc=desc, disable=not self.progress, leave=False)
        for i in range(0, len(items), self.batch_size):
            yield items[i:i + self.batch_size]
            bar.update(min(self.batch_size, len(items) - i))
        bar.close()

    def _score_rows(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: token lists of >= 2 tokens -> log p / greedy [b, longest - 1] of each next token."""
        s = max(len(r) for r in rows) - 1
        tokens = torch.zeros(len(rows), s, dtype=torch.int64)
        targets = torch.zeros(len(rows), s, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r) - 1] = torch.tensor(r[:-1])
            targets[i, :len(r) - 1] = torch.tensor(r[1:])
        return self.score(tokens, targets)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ``(key, context ids, continuation ids)`` -> ``(sum log p(continuation), is greedy)``."""
        # longest first, so a batch pads little; answers go back in request order
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list = [None] * len(requests)
        for batch in self._batches(order, "loglikelihood"):
            rows, conts = [], []
            for i in batch:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
                rows.append((ctx + cont)[-(self.max_length + 1):])
                conts.append(cont[-self.max_length:])
            logprob, greedy = self._score_rows(rows)
            for j, (i, row, cont) in enumerate(zip(batch, rows, conts)):
                end, n = len(row) - 1, len(cont)  # the continuation is predicted at the last n positions
                ll = float(logprob[j, end - n:end].double().sum())
                is_greedy = bool((greedy[j, end - n:end] == torch.tensor(cont)).all())
                out[i] = (ll, is_greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window,
                         lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string, add_special_tokens=False),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # --- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for batch in self._batches(order, "generate_until"):
            for i, text in zip(batch, self._generate([requests[i].args for i in batch])):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, args: list[tuple[str, dict]]) -> list[str]:
        stops, budgets, rows = [], [], []
        for context, kwargs in args:
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise GenerationRefused(f"a task asks for sampled generation ({kwargs}); mllama-eval's native "
                                        "backend decodes greedily only: use a task with do_sample: false")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            stops.append(until)
            budgets.append(budget)
            rows.append(self.tok_encode(context)[-max(1, self.max_length - budget):])
        generated = [[] for _ in rows]
        live = list(range(len(rows)))
        while live:
            seqs = [rows[i] + generated[i] for i in live]
            s = max(len(q) for q in seqs)
            tokens = torch.zeros(len(seqs), s, dtype=torch.int64)
            for j, q in enumerate(seqs):
                tokens[j, :len(q)] = torch.tensor(q)
            _, greedy = self.score(tokens, torch.zeros_like(tokens))
            still = []
            for j, i in enumerate(live):
                nxt = int(greedy[j, len(seqs[j]) - 1])
                if nxt == self.tok.eos_id:
                    continue
                generated[i].append(nxt)
                text = self.tok_decode(generated[i])
                done = (any(u in text for u in stops[i]) or len(generated[i]) >= budgets[i]
                        or len(rows[i]) + len(generated[i]) >= self.max_length)
                if not done:
                    still.append(i)
            live = still
        texts = []
        for i, ids in enumerate(generated):
            text = self.tok_decode(ids)
            for u in stops[i]:
                if u:
                    text = text.split(u)[0]
            texts.append(text)
        return texts
