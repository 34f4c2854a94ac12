"""The chat template, declared once: how a conversation becomes token ids and which are answers.

One ``ChatTemplate`` value drives both directions, so training and inference cannot disagree:

* ``encode(messages, tokenizer)`` -> (ids, answer mask) for training (``mllama-preprocess --sft``);
* ``jinja()`` -> the same format as a Jinja string for the exported ``tokenizer_config.json``
  (``chat_template``), rendered by ``transformers``' ``apply_chat_template``; a test checks that
  both give the same ids.

The default is Llama 2's chat format (Touvron et al. 2023b; Meta's ``chat_completion``)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST] ...

Every user turn starts with BOS; every answer ends with EOS. BOS and EOS are token ids, never
text. Contents are ``strip()``-ed. The loss is taken on the answer text and its EOS only.
Each turn's text (between BOS and EOS) is encoded as one SentencePiece call, like Meta's
reference, and split at the prompt's length (SentencePiece never merges across the space
before an answer, so the prompt's ids are a prefix of the turn's ids; checked per turn).

``llama3`` is Llama 3's format (Meta's ``ChatFormat``), for tokenizers that have its special
tokens (Meta's, or ``mllama-tokenizer train --kind bpe-bytelevel``)::

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>...

one header + content + ``<|eot_id|>`` per message (system, user, assistant), BOS once. The
special tokens are ids; the text between them is encoded piece by piece, as ``transformers``
does when it splits a rendered template at its special tokens. The loss is taken on each
answer's content and its ``<|eot_id|>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

ROLES = ("system", "user", "assistant")


class TemplateError(ValueError):
    """A conversation that this template cannot render (the reason is the message)."""


class _Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def check_messages(messages: Sequence[dict], name: str, reserved: Sequence[str]) -> None:
    """Raise TemplateError unless ``messages`` is [system?] user assistant (user assistant)*
    with string contents free of the template's markup (``reserved``)."""
    if not messages:
        raise TemplateError("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TemplateError(f"bad message: message {i} is not an object with a role and a content")
        if m["role"] not in ROLES:
            raise TemplateError(f"unknown role: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise TemplateError(f"content not a string: message {i} content is {type(m['content']).__name__}")
        for bad in reserved:
            if bad in m["content"]:
                raise TemplateError(f"template markup in content: message {i} contains {bad!r}, which the "
                                    f"{name} template uses as markup, so it would not render unambiguously")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    got = [m["role"] for m in turns]
    if got != expected[:len(got)] or not got:
        raise TemplateError("roles in a wrong order: expected [system] user assistant (user assistant)..., "
                            f"got {' '.join(m['role'] for m in messages)}")
    if got[-1] != "assistant":
        raise TemplateError("no final answer: the conversation ends with a user message")
    for i, m in enumerate(turns):
        if m["role"] == "assistant" and not m["content"].strip():
            raise TemplateError(f"empty answer (assistant message {i // 2 + 1})")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system_format: str      # wraps the system prompt, prepended to the first user message
    user_format: str        # the text of a user turn (after BOS)
    answer_format: str      # the text of an answer (before EOS)
    reserved: tuple         # strings a content may not contain: they would fake the format
    trained_kind: str = "sentencepiece"  # the tokenizer a quickstart SFT run trains for it

    def check(self, messages: Sequence[dict]) -> None:
        """Raise TemplateError unless ``messages`` is [system?] user assistant (user assistant)*."""
        check_messages(messages, self.name, self.reserved)

    def turns(self, messages: Sequence[dict], generation: bool = False) -> list[tuple[str, Optional[str]]]:
        """``[(prompt text, answer text or None), ...]`` one per user turn. ``generation``
        allows a final user turn without an answer (a prompt to complete)."""
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        out = []
        for i in range(0, len(messages), 2):
            user = messages[i]["content"].strip()
            if i == 0 and system is not None:
                user = self.system_format.format(system=system) + user
            answer = messages[i + 1]["content"].strip() if i + 1 < len(messages) else None
            if answer is None and not generation:
                raise TemplateError("the conversation ends with a user message")
            out.append((self.user_format.format(content=user),
                        None if answer is None else self.answer_format.format(content=answer)))
        return out

    def encode(self, messages: Sequence[dict], tok: _Tokenizer) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 where ids[i] is answer text or the EOS closing an answer.

        Raises TemplateError for a conversation the template cannot render."""
        self.check(messages)
        ids, mask = [], []
        for prompt, answer in self.turns(messages):
            prompt_ids, turn_ids = tok.encode(prompt), tok.encode(prompt + answer)
            if turn_ids[:len(prompt_ids)] != prompt_ids:
                raise TemplateError("template does not render: the answer's first token merges with the prompt's last one")
            n_answer = len(turn_ids) - len(prompt_ids)
            ids += [tok.bos_id, *turn_ids, tok.eos_id]
            mask += [0] * (1 + len(prompt_ids)) + [1] * (n_answer + 1)
        return ids, mask

    def encode_prompt(self, messages: Sequence[dict], tok: _Tokenizer) -> list[int]:
        """Ids of a conversation ending with a user message, ready for the model to answer."""
        ids = []
        for prompt, answer in self.turns(messages, generation=True):
            ids += [tok.bos_id, *tok.encode(prompt if answer is None else prompt + answer)]
            if answer is not None:
                ids.append(tok.eos_id)
        return ids

    def jinja(self) -> str:
        """This template for ``transformers``' ``apply_chat_template`` (tokenizer_config.json)."""
        def lit(s: str) -> str:
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
        sys_pre, sys_post = self.system_format.split("{system}")
        user_pre, user_post = self.user_format.split("{content}")
        ans_pre, ans_post = self.answer_format.split("{content}")
        return (
            "{% if messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
            "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
            "{% for m in turns %}"
            "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
            "{% endif %}"
            "{% set content = m['content'] | trim %}"
            "{% if loop.index0 == 0 and system is not none %}"
            f"{{% set content = {lit(sys_pre)} + system + {lit(sys_post)} + content %}}"
            "{% endif %}"
            f"{{% if m['role'] == 'user' %}}{{{{ bos_token + {lit(user_pre)} + content + {lit(user_post)} }}}}"
            f"{{% else %}}{{{{ {lit(ans_pre)} + content + {lit(ans_post)} + eos_token }}}}{{% endif %}}"
            "{% endfor %}")

    def hf_tokenizer_config(self) -> dict:
        """Entries for an exported ``tokenizer_config.json``. ``legacy: true``: after ``<s>`` the
        text gets SentencePiece's dummy-prefix space, as in Meta's reference (each turn encoded
        by one ``sp.encode``) and in our training ids; ``legacy: false`` would tokenize
        ``<s>[INST]`` as ``[`` instead of ``▁[`` and prompt the model off its training format."""
        return {"chat_template": self.jinja(), "legacy": True}


LLAMA2 = ChatTemplate(
    name="llama2",
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    user_format="[INST] {content} [/INST]",
    answer_format=" {content} ",
    reserved=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>"),
)

@dataclass(frozen=True)
class HeaderChatTemplate:
    """Llama 3's format (see the module docstring): every message is a header naming its role,
    a blank line, the content and an end-of-turn token; all markup is special tokens."""
    name: str
    bos: str
    start_header: str
    end_header: str
    end_turn: str
    reserved: tuple
    trained_kind: str = "bpe-bytelevel"

    def check(self, messages: Sequence[dict]) -> None:
        check_messages(messages, self.name, self.reserved)

    def special_ids(self, tok) -> tuple[int, int, int, int]:
        """(bos, start_header, end_header, end_turn) ids; ConfigError if ``tok`` lacks one (every
        conversation would fail, so it is the tokenizer that is wrong, not a record)."""
        from ..config.errors import ConfigError
        ids = []
        for token in (self.bos, self.start_header, self.end_header, self.end_turn):
            i = tok.token_to_id(token)
            if i is None:
                raise ConfigError(f"tokenizer {tok.path} has no {token} token, which the {self.name} chat template "
                                  "needs: use a Llama 3 tokenizer (tokenizer.json) or train one with "
                                  "`mllama-tokenizer train --kind bpe-bytelevel`")
            ids.append(i)
        return tuple(ids)

    def turns(self, messages: Sequence[dict], generation: bool = False) -> list[tuple[str, Optional[str]]]:
        """``[(header text, content), ...]`` one per message: the text a tokenizer is trained on."""
        return [(f"{m['role']}\n\n", m["content"].strip()) for m in messages]

    def _message(self, m: dict, tok, ids: tuple) -> tuple[list[int], int]:
        """(ids of one message, how many of them are header), the content encoded after the blank
        line in one call and split there (checked, like the llama2 template's turns)."""
        _, start, end, _ = ids
        head = tok.encode("\n\n")
        body = tok.encode("\n\n" + m["content"].strip())
        if body[:len(head)] != head:
            raise TemplateError("template does not render: the content's first token merges with the blank line "
                                "after the header")
        header = [start, *tok.encode(m["role"]), end, *head]
        return header + body[len(head):], len(header)

    def encode(self, messages: Sequence[dict], tok) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 where ids[i] is answer content or the ``<|eot_id|>`` closing it."""
        self.check(messages)
        special = self.special_ids(tok)
        ids, mask = [special[0]], [0]
        for m in messages:
            part, n_header = self._message(m, tok, special)
            answer = int(m["role"] == "assistant")
            ids += [*part, special[3]]
            mask += [0] * n_header + [answer] * (len(part) - n_header + 1)
        return ids, mask

    def encode_prompt(self, messages: Sequence[dict], tok) -> list[int]:
        """Ids of a conversation ending with a user message, then the assistant's header."""
        special = self.special_ids(tok)
        ids = [special[0]]
        for m in messages:
            ids += [*self._message(m, tok, special)[0], special[3]]
        return ids + self._message({"role": "assistant", "content": ""}, tok, special)[0]

    def jinja(self) -> str:
        def lit(s: str) -> str:
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
        head = f"{lit(self.start_header)} + m['role'] + {lit(self.end_header + chr(10) * 2)}"
        return (
            f"{{{{ {lit(self.bos)} }}}}"
            "{% if messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}"
            "{% else %}{% set turns = messages %}{% endif %}"
            "{% for m in turns %}"
            "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
            "{% endif %}{% endfor %}"
            "{% for m in messages %}"
            f"{{{{ {head} + (m['content'] | trim) + {lit(self.end_turn)} }}}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {lit(self.start_header + 'assistant' + self.end_header + chr(10) * 2)} }}}}"
            "{% endif %}")

    def hf_tokenizer_config(self) -> dict:
        """Entries for an exported ``tokenizer_config.json``."""
        return {"chat_template": self.jinja()}


LLAMA3 = HeaderChatTemplate(
    name="llama3", bos="<|begin_of_text|>", start_header="<|start_header_id|>", end_header="<|end_header_id|>",
    end_turn="<|eot_id|>",
    reserved=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

TEMPLATES = {t.name: t for t in (LLAMA2, LLAMA3)}


def chat_template(name: str) -> ChatTemplate:
    from ..config.errors import ConfigError
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
