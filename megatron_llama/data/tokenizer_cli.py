"""``mllama-tokenizer``: train a LLaMA-style SentencePiece BPE model, or inspect one."""
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
  # what is in a tokenizer (yours or Meta's tokenizer.model):
  mllama-tokenizer info runs/tok.model

settings (LLaMA's): BPE, digits split, byte fallback (any UTF-8 round-trips, nothing is <unk>),
no normalisation or whitespace folding, unk=0 bos=1 eos=2, no pad piece (pad_id -1).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mllama-tokenizer", description=__doc__,
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a BPE model from JSONL or .txt files",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL (.jsonl, .gz, .zst) or plain .txt files")
    tr.add_argument("--output", required=True, metavar="PREFIX",
                    help="writes PREFIX.model and PREFIX.vocab")
    tr.add_argument("--vocab-size", type=int, required=True, help="e.g. 32000 (LLaMA); >= ~300")
    tr.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    tr.add_argument("--max-sentences", type=int, default=5_000_000,
                    help="lines read for training (default 5M; SentencePiece samples from them)")
    info = sub.add_parser("info", help="vocab size, special ids and checksum of a .model")
    info.add_argument("model", help="a SentencePiece .model file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    from .tokenizer import Tokenizer, train_tokenizer  # after --help: keeps it instant
    try:
        if args.cmd == "train":
            path = train_tokenizer(args.input, args.output, args.vocab_size, args.text_key,
                                   max_sentences=args.max_sentences)
            print(f"wrote {path}")
            print(Tokenizer.load(path).describe())
        else:
            tok = Tokenizer.load(args.model)
            facts = {"path": tok.path, "vocab_size": tok.vocab_size, "unk_id": tok.unk_id,
                     "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                     "sha256": tok.checksum}
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
