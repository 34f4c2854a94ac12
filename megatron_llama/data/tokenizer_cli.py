"""``mllama-tokenizer``: train a tokenizer (SentencePiece BPE or byte-level BPE), inspect one, or extend one."""
from __future__ import annotations

import argparse
import json
import sys

from ..config.errors import ConfigError

EPILOG = """\
examples:
  # a 32k LLaMA-style BPE tokenizer from JSONL (documents under "text"):
  mllama-tokenizer train --input web.jsonl.gz books.jsonl --vocab-size 32000 --output tok/llama32k
  # the tiny quickstart tokenizer from the embedded corpus:
  mllama-tokenizer train --input data/corpus.jsonl --vocab-size 512 --output runs/tok
  # a Llama 3-style byte-level BPE (writes tok/bpe128k/tokenizer.json + tokenizer_config.json):
  mllama-tokenizer train --kind bpe-bytelevel --input web.jsonl.gz --vocab-size 128000 --output tok/bpe128k
  # what is in a tokenizer (a .model, a tokenizer.json, Meta's Llama 3 tokenizer.model, or a directory):
  mllama-tokenizer info runs/tok.model
  mllama-tokenizer info Meta-Llama-3-8B/

  # continual pretraining on a new language (Swallow): learn its tokens, append them (old ids unchanged):
  mllama-tokenizer extend Llama-2-7b/tokenizer.model --input ja.jsonl --vocab-size 43176 --output tok/llama2-ja
  mllama-tokenizer extend Meta-Llama-3-8B/ --input ja.jsonl --vocab-size 160000 --output tok/llama3-ja
  # or merge in the new tokens of a second tokenizer of the same kind and layout:
  mllama-tokenizer extend tok/base.model --merge tok/ja.model --output tok/merged

kinds:
  sentencepiece (default): LLaMA 1/2's settings: BPE, digits split, byte fallback (any UTF-8
    round-trips, nothing is <unk>), no normalisation or whitespace folding, unk=0 bos=1 eos=2,
    no pad piece (pad_id -1). Writes PREFIX.model and PREFIX.vocab.
  bpe-bytelevel: Llama 3's layout (its pre-tokenizer regex, 256 byte tokens, no <unk>), trained
    with the Hugging Face tokenizers library; specials <|begin_of_text|> (bos) <|end_of_text|>
    (eos) <|start_header_id|> <|end_header_id|> <|eot_id|> (the llama3 chat template) are ids 0-4.
    Writes DIR/tokenizer.json and DIR/tokenizer_config.json.
Both files depend only on the corpus and the options: training twice gives the same bytes.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mllama-tokenizer", description=__doc__,
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a BPE model from JSONL or .txt files",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL (.jsonl, .gz, .zst) or plain .txt files")
    tr.add_argument("--kind", choices=("sentencepiece", "bpe-bytelevel"), default="sentencepiece",
                    help="sentencepiece (LLaMA 1/2, default) or bpe-bytelevel (Llama 3-style tokenizer.json)")
    tr.add_argument("--output", required=True, metavar="PREFIX|DIR",
                    help="sentencepiece: writes PREFIX.model and PREFIX.vocab; bpe-bytelevel: writes "
                         "DIR/tokenizer.json and DIR/tokenizer_config.json")
    tr.add_argument("--vocab-size", type=int, required=True,
                    help="e.g. 32000 (LLaMA), 128000 (Llama 3); >= ~300")
    tr.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    tr.add_argument("--max-sentences", type=int, default=5_000_000,
                    help="lines (sentencepiece) or documents (bpe-bytelevel) read for training (default 5M)")
    info = sub.add_parser("info", help="kind, vocab size, special ids and checksum of a tokenizer")
    info.add_argument("model", help="a tokenizer.model, tokenizer.json, or a directory holding one")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    ext = sub.add_parser("extend", help="append new tokens (from a corpus, or a second tokenizer); old ids unchanged",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ext.add_argument("base", help="the tokenizer to extend (tokenizer.model, tokenizer.json, or its directory)")
    src = ext.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help="learn new tokens from these JSONL/.txt files")
    src.add_argument("--merge", metavar="TOKENIZER", help="append the tokens of this tokenizer that the base lacks")
    ext.add_argument("--vocab-size", type=int,
                     help="size of the extended tokenizer (required with --input; with --merge: a cap)")
    ext.add_argument("--output", required=True, metavar="PREFIX|DIR",
                     help="sentencepiece: writes PREFIX.model; tokenizer.json kinds: writes DIR/tokenizer.json "
                          "and DIR/tokenizer_config.json")
    ext.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    args = ap.parse_args(argv)
    from .tokenizer import load_tokenizer  # after --help: keeps it instant
    try:
        if args.cmd == "extend":
            from .tokenizer_extend import extend_tokenizer
            print(extend_tokenizer(args.base, args.output, inputs=args.input, merge=args.merge,
                                   vocab_size=args.vocab_size, text_key=args.text_key).describe())
            return 0
        if args.cmd == "train":
            if args.kind == "bpe-bytelevel":
                from .tokenizer_hf import train_bpe_bytelevel
                path = train_bpe_bytelevel(args.input, args.output, args.vocab_size, args.text_key,
                                           max_documents=args.max_sentences, progress=sys.stderr.isatty())
            else:
                from .tokenizer_sp import train_tokenizer
                path = train_tokenizer(args.input, args.output, args.vocab_size, args.text_key,
                                       max_sentences=args.max_sentences)
            print(f"wrote {path}")
            tok = load_tokenizer(path)
            print(tok.describe())
            if tok.vocab_size < args.vocab_size:
                print(f"note: the corpus gave only {tok.vocab_size} ids (no more pairs occur twice); "
                      f"set model.vocab_size >= {tok.vocab_size}")
        else:
            tok = load_tokenizer(args.model)
            facts = tok.facts()
            if args.json:
                print(json.dumps(facts))
            else:
                for k, v in facts.items():
                    print(f"{k:>10}: {v}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
