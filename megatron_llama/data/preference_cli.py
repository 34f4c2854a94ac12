"""``mllama-preprocess --preference``: preference JSONL -> both sides' tokens + answer masks + margins."""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
preference pairs (--preference) examples (reward models, DPO):
  mllama-preprocess --preference --input data/preferences.jsonl --tokenizer runs/tok.model --output runs/pref
  mllama-preprocess --preference --input hh.jsonl --tokenizer tokenizer.model --output /data/hh \\
                    --messages-key history --chosen-key better --rejected-key worse --seq-len 1024

records (one JSON object per line; --prompt-key/--messages-key/--system-key/--role-key/--content-key
as for --sft):
  {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 2}      (margin, system optional)
  {"messages": [... ending with a user turn], "chosen": {"role": "assistant", "content": "..."},
   "rejected": [{"role": "assistant", "content": "..."}]}
Both sides are rendered with the chat template (--chat-template) as SFT conversations ending in that
answer; the answer mask marks the answer and its EOS. Output: PREFIX.bin/.idx (sequence 2i = pair i's
chosen side, 2i+1 its rejected side), PREFIX.lossmask.bin/.idx, PREFIX.margin.npy, PREFIX.pref.json
(template, tokenizer checksum, counts; the trainer refuses a set made with another tokenizer or
template). Use it as
  train: {objective: reward}   data: {sources: [{path: PREFIX}], tokenizer: TOKENIZER.model}
Bad records (invalid JSON, unknown shape, an empty side, identical sides, a bad margin, content with
template markup, pairs longer than --seq-len with --overlong drop, or that truncation leaves without
an answer or identical) are skipped, listed with line numbers and counted.
"""


def add_preference_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("preference pairs (--preference)")
    g.add_argument("--preference", action="store_true", help="records are chosen/rejected answer pairs")
    g.add_argument("--chosen-key", default="chosen", help="field of the preferred answer (default: chosen)")
    g.add_argument("--rejected-key", default="rejected", help="field of the other answer (default: rejected)")
    g.add_argument("--margin-key", default="margin", help="field of the optional preference margin (default: margin)")


def run_preference(args) -> int:
    from .preference_preprocess import preprocess_preference
    from .preprocess_cli import run_and_report
    from .preference_records import PairFields
    if args.sft:
        print("error: --sft and --preference are exclusive: pick the kind of records the input holds",
              file=sys.stderr)
        return 2
    fields = PairFields(prompt=args.prompt_key, system=args.system_key, messages=args.messages_key,
                        chosen=args.chosen_key, rejected=args.rejected_key, margin=args.margin_key,
                        role=args.role_key, content=args.content_key)
    return run_and_report(lambda: preprocess_preference(args.input, args.output, args.tokenizer,
                                                        template=args.chat_template, fields=fields,
                                                        seq_len=args.seq_len, overlong=args.overlong,
                                                        strict=args.strict, progress=not args.quiet))
