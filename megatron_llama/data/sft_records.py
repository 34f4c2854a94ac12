"""Supervised fine-tuning records: a JSONL line -> a conversation -> (ids, answer mask).

Two record shapes are accepted (field names configurable through ``RecordFields``)::

    {"prompt": "...", "response": "...", "system": "..."?}             one turn
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   a chat

Every way a record can be unusable is a short reason string (the preprocessor lists the first
few with line numbers and counts the rest): invalid JSON, neither shape, an empty answer, roles
in a wrong order, content the template cannot render, a sample longer than ``seq_len``
(``overlong = "drop"``, or ``"truncate"`` that leaves no answer token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .chat_template import ChatTemplate, TemplateError
from .jsonl import parse_object

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class RecordFields:
    prompt: str = "prompt"
    response: str = "response"
    system: str = "system"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"


def read_messages(raw, messages_key: str, role_key: str, content_key: str) -> tuple[Optional[list], Optional[str]]:
    """A record's message list (field ``messages_key``) as ``[{"role", "content"}]``, or (None, reason)."""
    if not isinstance(raw, list):
        return None, f"bad message: field {messages_key!r} is {type(raw).__name__}, not a list"
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            return None, (f"bad message: message {i} has no {role_key!r}/{content_key!r} fields "
                          "(choose them with --role-key / --content-key)")
        messages.append({"role": m[role_key], "content": m[content_key]})
    return messages, None


def parse_record(line: bytes, fields: RecordFields = RecordFields()) -> tuple[Optional[list], Optional[str]]:
    """(messages, None) for a usable line's conversation, (None, reason) for a bad one,
    (None, None) for a blank line. Messages are ``[{"role", "content"}]`` (not yet validated
    against a template: ``ChatTemplate.check`` does that)."""
    obj, reason = parse_object(line)
    if obj is None:
        return None, reason
    if fields.messages in obj:
        return read_messages(obj[fields.messages], fields.messages, fields.role, fields.content)
    if fields.prompt in obj and fields.response in obj:
        messages = [{"role": "user", "content": obj[fields.prompt]},
                    {"role": "assistant", "content": obj[fields.response]}]
        if obj.get(fields.system) is not None:
            messages.insert(0, {"role": "system", "content": obj[fields.system]})
        return messages, None
    keys = ", ".join(list(obj)[:5])
    return None, (f"unknown record shape: neither {fields.messages!r} nor {fields.prompt!r}+{fields.response!r} fields "
                  f"(keys: {keys}); choose them with --messages-key / --prompt-key / --response-key")


def fit_length(ids: list, mask: list, seq_len: int, policy: str) -> tuple[Optional[tuple], Optional[str]]:
    """A sample must fit one packed sequence of ``seq_len`` positions. ((ids, mask), None) when it
    fits (truncated if needed), (None, reason) when it is dropped."""
    if len(ids) <= seq_len:
        return (ids, mask), None
    if policy == "drop":
        return None, f"longer than seq_len: {len(ids)} tokens > {seq_len} (overlong=drop)"
    ids, mask = ids[:seq_len], mask[:seq_len]
    if not any(mask[1:]):  # position 0 is never a target
        return None, f"longer than seq_len: truncated to {seq_len} tokens, no answer token is left"
    return (ids, mask), None


def encode_record(line: bytes, template: ChatTemplate, tok, fields: RecordFields = RecordFields(),
                  seq_len: Optional[int] = None, overlong: str = "truncate"
                  ) -> tuple[Optional[tuple], Optional[str], bool]:
    """(ids, mask) or None, the reason it was skipped, and whether it was truncated."""
    messages, reason = parse_record(line, fields)
    if messages is None:
        return None, reason, False
    try:
        ids, mask = template.encode(messages, tok)
    except TemplateError as e:
        return None, str(e), False
    if seq_len is None:
        return (ids, mask), None, False
    fitted, reason = fit_length(ids, mask, seq_len, overlong)
    return fitted, reason, fitted is not None and len(fitted[0]) < len(ids)


def template_text(messages: Sequence[dict], template: ChatTemplate) -> str:
    """A conversation as plain text (tokenizer training): every turn's prompt and answer."""
    return "\n".join(p + (a or "") for p, a in template.turns(messages, generation=True))
