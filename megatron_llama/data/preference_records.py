"""Preference records: a JSONL line -> (conversation so far, chosen answer, rejected answer, margin).

Accepted shapes (field names configurable through ``PairFields``)::

    {"prompt": "...", "system": "..."?, "chosen": "...", "rejected": "...", "margin": 1.5?}
    {"messages": [{"role": "user", "content": "..."}, ...], "chosen": ..., "rejected": ...}

``messages`` is the conversation up to the question (it ends with a user turn). ``chosen`` and
``rejected`` are each a string, an assistant turn ``{"role": "assistant", "content": "..."}``, or a
list holding one assistant turn (TRL's conversational format). ``margin`` (optional, default 0) is
how much more strongly the chosen answer was preferred (Llama 2's rating-scale margin).

Both sides are encoded with the chat template as an SFT conversation ending in that answer, so
their ids share the prompt and the answer masks mark only the answer and its EOS. Bad records
are reasons (the preprocessor lists the first few with line numbers and counts the rest):
invalid JSON, unknown shape, an empty side, identical sides, a bad margin, content the template
cannot render, a pair longer than ``seq_len`` (``drop``; ``truncate`` cuts both sides and drops
the pair when a side has no answer token left or the cut sides become identical).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .chat_template import ChatTemplate, TemplateError
from .jsonl import parse_object
from .sft_records import OVERLONG_POLICIES, read_messages

__all__ = ["PairFields", "parse_pair", "encode_pair", "OVERLONG_POLICIES"]


@dataclass(frozen=True)
class PairFields:
    prompt: str = "prompt"
    system: str = "system"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str = "margin"
    role: str = "role"
    content: str = "content"


@dataclass(frozen=True)
class Pair:
    context: list          # messages up to (and including) the last user turn
    chosen: str
    rejected: str
    margin: float


def _answer(value, side: str, f: PairFields) -> tuple[Optional[str], Optional[str]]:
    """The answer text of one side, or the reason it is unusable."""
    if isinstance(value, list):
        if len(value) != 1:
            return None, (f"bad {side}: a list must hold exactly one assistant turn, it holds {len(value)} "
                          "items (put the conversation in the messages field)")
        value = value[0]
    if isinstance(value, dict):
        if value.get(f.role) != "assistant" or f.content not in value:
            return None, (f"bad {side}: a turn must be {{{f.role!r}: 'assistant', {f.content!r}: ...}} "
                          "(choose the keys with --role-key / --content-key)")
        value = value[f.content]
    if not isinstance(value, str):
        return None, f"bad {side}: expected a string or an assistant turn, got {type(value).__name__}"
    if not value.strip():
        return None, f"empty {side} answer"
    return value, None


def parse_pair(line: bytes, f: PairFields = PairFields()) -> tuple[Optional[Pair], Optional[str]]:
    """(pair, None), (None, reason) for a bad line, or (None, None) for a blank one."""
    obj, reason = parse_object(line)
    if obj is None:
        return None, reason
    if f.chosen not in obj or f.rejected not in obj:
        keys = ", ".join(list(obj)[:5])
        return None, (f"unknown record shape: no {f.chosen!r} and {f.rejected!r} fields (keys: {keys}); "
                      "choose them with --chosen-key / --rejected-key")
    if f.messages in obj:
        context, reason = read_messages(obj[f.messages], f.messages, f.role, f.content)
        if context is None:
            return None, reason
    elif f.prompt in obj:
        context = [{"role": "user", "content": obj[f.prompt]}]
        if obj.get(f.system) is not None:
            context.insert(0, {"role": "system", "content": obj[f.system]})
    else:
        return None, (f"unknown record shape: neither {f.messages!r} nor {f.prompt!r} field; choose them with "
                      "--messages-key / --prompt-key")
    chosen, reason = _answer(obj[f.chosen], "chosen", f)
    if chosen is None:
        return None, reason
    rejected, reason = _answer(obj[f.rejected], "rejected", f)
    if rejected is None:
        return None, reason
    if chosen.strip() == rejected.strip():
        return None, "identical sides: chosen and rejected are the same answer"
    margin = obj.get(f.margin, 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return None, f"bad margin: {f.margin!r} must be a finite number, got {margin!r}"
    return Pair(context, chosen, rejected, float(margin)), None


def encode_pair(pair: Pair, template: ChatTemplate, tok, seq_len: Optional[int] = None,
                overlong: str = "truncate") -> tuple[Optional[tuple], Optional[str], bool]:
    """((chosen ids, mask), (rejected ids, mask)) or None, the reason it was skipped, and whether
    it was truncated."""
    sides = []
    for answer in (pair.chosen, pair.rejected):
        try:
            sides.append(template.encode(pair.context + [{"role": "assistant", "content": answer}], tok))
        except TemplateError as e:
            return None, str(e), False
    return fit_pair(sides, seq_len, overlong)


def fit_pair(sides: list, seq_len: Optional[int], overlong: str) -> tuple[Optional[tuple], Optional[str], bool]:
    """Both sides of a pair within ``seq_len`` tokens (see the module doc)."""
    longest = max(len(ids) for ids, _ in sides)
    if seq_len is None or longest <= seq_len:
        return tuple(sides), None, False
    if overlong == "drop":
        return None, f"longer than seq_len: {longest} tokens > {seq_len} (overlong=drop)", False
    cut = [(list(ids[:seq_len]), list(mask[:seq_len])) for ids, mask in sides]
    if not all(any(mask[1:]) for _, mask in cut):  # position 0 is never a target
        return None, f"longer than seq_len: truncated to {seq_len} tokens, a side has no answer token left", False
    if cut[0][0] == cut[1][0]:
        return None, f"longer than seq_len: truncated to {seq_len} tokens, the two sides become identical", False
    return tuple(cut), None, True
