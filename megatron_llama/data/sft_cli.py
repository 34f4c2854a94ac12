"""``mllama-preprocess --sft``: prompt/response or chat JSONL -> tokens + answer mask (+ manifest)."""
from __future__ import annotations

import argparse

EPILOG = """\
supervised fine-tuning (--sft) examples:
  mllama-preprocess --sft --input data/instructions.jsonl --tokenizer runs/tok.model --output runs/sft
  mllama-preprocess --sft --input chats.jsonl --tokenizer tokenizer.model --output /data/chat \\
                    --messages-key conversation --role-key from --content-key value --seq-len 4096

records (one JSON object per line):
  {"prompt": "...", "response": "...", "system": "..."}          (system optional)
  {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}

chat template (--chat-template llama2, the default; Llama 2's chat format):
  <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user 2} [/INST] ...
--chat-template llama3 (Llama 3's; needs a tokenizer with its special tokens, e.g. a Llama 3
tokenizer.json or `mllama-tokenizer train --kind bpe-bytelevel`):
  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant...
The loss is taken on answer tokens and the EOS (llama3: <|eot_id|>) after each answer only. The same template is
written into an exported model's tokenizer_config.json (chat_template).

Output: PREFIX.bin/.idx (tokens: the Megatron format), PREFIX.lossmask.bin/.idx (uint8 answer
mask, same lengths) and PREFIX.sft.json. Use it in a run as
  data: {sft: true, sources: [{path: PREFIX}], tokenizer: TOKENIZER.model}
Bad records (invalid JSON, unknown shape, empty answer, roles out of order, content with
template markup, too long with --seq-len and --overlong drop) are skipped, listed and counted.
"""


def add_sft_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("supervised fine-tuning (--sft)")
    g.add_argument("--sft", action="store_true", help="records are prompt/response or chat messages")
    g.add_argument("--chat-template", default="llama2", help="conversation format: llama2 (default) or llama3")
    g.add_argument("--prompt-key", default="prompt", help="field of a one-turn record's question (default: prompt)")
    g.add_argument("--response-key", default="response", help="its answer (default: response)")
    g.add_argument("--system-key", default="system", help="its optional system prompt (default: system)")
    g.add_argument("--messages-key", default="messages", help="field of a chat record's message list (default: messages)")
    g.add_argument("--role-key", default="role", help="a message's role field (default: role)")
    g.add_argument("--content-key", default="content", help="a message's text field (default: content)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="fit samples to this many tokens now (default: the trainer does, with data.seq_len)")
    g.add_argument("--overlong", default="truncate", help="truncate (default) or drop samples longer than --seq-len")


def run_sft(args) -> int:
    from .preprocess_cli import run_and_report
    from .sft_preprocess import preprocess_sft
    from .sft_records import RecordFields
    fields = RecordFields(prompt=args.prompt_key, response=args.response_key, system=args.system_key,
                          messages=args.messages_key, role=args.role_key, content=args.content_key)
    return run_and_report(lambda: preprocess_sft(args.input, args.output, args.tokenizer,
                                                 template=args.chat_template, fields=fields, seq_len=args.seq_len,
                                                 overlong=args.overlong, strict=args.strict,
                                                 progress=not args.quiet))
