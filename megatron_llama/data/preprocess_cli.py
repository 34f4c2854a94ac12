"""``mllama-preprocess``: JSONL corpus -> Megatron indexed dataset (PREFIX.bin + PREFIX.idx)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ..config.errors import ConfigError

EPILOG = """\
examples:
  mllama-preprocess --input data/corpus.jsonl --tokenizer runs/tok.model --output runs/corpus
  mllama-preprocess --input shard-*.jsonl.zst --tokenizer tok/llama32k.model \\
                    --output /data/web --text-key content --workers 16

Every document gets EOS appended. The output is what Megatron-LM and GPT-NeoX read (and they
write what we read): use it in a run as  data.sources: [{path: runs/corpus, weight: 1}]
together with  data.tokenizer: runs/tok.model.
Bad lines (invalid JSON, missing/non-string/empty text) are skipped and listed with their line
numbers; --strict stops at the first. Files appear only when complete (written under a
temporary name, renamed at the end).
"""


def run_and_report(preprocess: Callable[[], Any]) -> int:
    """Run one kind of preprocessing and print its summary's ``describe()``; the exit status:
    2 with one ``error:`` line for bad input, 130 on Ctrl-C (only temporary files were written)."""
    try:
        summary = preprocess()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written (partial output was under a temporary name)", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    from .preference_cli import EPILOG as PREF_EPILOG, add_preference_arguments, run_preference
    from .sft_cli import EPILOG as SFT_EPILOG, add_sft_arguments, run_sft
    ap = argparse.ArgumentParser(prog="mllama-preprocess", description=__doc__,
                                 epilog=EPILOG + "\n" + SFT_EPILOG + "\n" + PREF_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL files, plain, .gz or .zst, one document per line")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.model (SentencePiece, or Meta's Llama 3), tokenizer.json, or "
                         "a model directory holding one (mllama-tokenizer train)")
    ap.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    ap.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping")
    ap.add_argument("--chunk-mb", type=float, default=1.0, help="input handed to a worker at a time")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sft_arguments(ap)
    add_preference_arguments(ap)
    args = ap.parse_args(argv)
    if args.preference:
        return run_preference(args)
    if args.sft:
        return run_sft(args)
    from .preprocess import preprocess
    return run_and_report(lambda: preprocess(args.input, args.output, args.tokenizer, text_key=args.text_key,
                                             workers=args.workers, strict=args.strict,
                                             chunk_bytes=int(args.chunk_mb * 1e6), progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
