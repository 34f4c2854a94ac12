"""mllama-convert: checkpoint conversion between Hugging Face, Meta and our native format.

Examples:

    # published HF weights -> a native checkpoint for TP2 x PP2 (weights only), then train from it
    mllama-convert hf-to-native meta-llama/Llama-2-7b-hf ckpt/llama2-7b-tp2pp2 --tp 2 --pp 2
    mllama-train configs/llama-7b.yaml model.preset=llama2-7b train.init_from=ckpt/llama2-7b-tp2pp2  # or =hf:DIR

    # a training run (its latest checkpoint, any TP x PP x DP, ZeRO 0-2) -> HF, with its tokenizer
    mllama-convert native-to-hf runs/tiny-cpu-3d hf/tiny --dtype bf16

    # Meta's original consolidated.NN.pth + params.json -> native
    mllama-convert meta-to-native llama-2-7b/ ckpt/llama2-7b-tp1 --tp 1 --pp 1 --tokenizer llama-2-7b/tokenizer.model
    mllama-convert meta-to-native Llama3.1-8B/ ckpt/llama3.1-8b --tp 2 --pp 2   # tiktoken tokenizer.model beside it

    # continue a run at another layout, with its optimizer state (then train.save_dir=OUT)
    mllama-convert reshard runs/llama-7b runs/llama-7b-tp4 --tp 4 --pp 1 --dp 2

    mllama-convert inspect runs/tiny-cpu-3d          # format, layout, step, tensors; loads nothing
    mllama-convert verify runs/tiny-cpu-3d hf/tiny   # same fixed tokens through both: max |diff|, KL

Every conversion streams (one layer in memory at a time; safetensors ``get_slice``, ``torch.load(mmap=True)``),
writes under a temporary name and renames at the end (``--force`` replaces an existing output), and
verifies the result with a forward pass when the model is small (``--verify auto``).
Bad input is one line ``error: ...`` and exit status 2, with nothing left behind.
"""
from __future__ import annotations

import argparse
import sys

from megatron_llama.config import ConfigError

_DTYPES = ("auto", "fp32", "bf16", "fp16")
_DTYPE_HELP = ("dtype of the written weights (default auto: the dtype they are stored in, so nothing is rounded "
               "unless asked; fp32 when the input mixes dtypes)")


def _common(p: argparse.ArgumentParser, verify: bool = True) -> None:
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if verify:
        p.add_argument("--verify", choices=("auto", "yes", "no"), default="auto",
                       help="forward the same tokens through input and output and compare logits "
                            "(auto: when the model has < 5e8 parameters)")


def _layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the output (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the output (default 1)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help=_DTYPE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllama-convert", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("hf-to-native", help="HF directory -> native checkpoint at --tp x --pp (weights only)",
                       description="Convert a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM directory (sharded "
                       "safetensors with index, or pytorch_model*.bin) to a weights-only native checkpoint. A run "
                       "starts from it with train.init_from=OUT (fresh optimizer, step 0).",
                       epilog="example: mllama-convert hf-to-native Llama-2-7b-hf ckpt/7b-tp2pp2 --tp 2 --pp 2")
    p.add_argument("hf_dir")
    p.add_argument("out")
    _layout(p)
    p.add_argument("--tokenizer", help="tokenizer.model to record as data.tokenizer (default: HF_DIR/tokenizer.model)")
    _common(p)

    p = sub.add_parser("native-to-hf", help="native checkpoint (any TP x PP x DP, ZeRO 0-2) -> HF directory",
                       description="Export a native checkpoint (a step directory, or a run directory: its latest) "
                       "to a Hugging Face directory: sharded safetensors + index, config.json, "
                       "generation_config.json and the run's tokenizer files.",
                       epilog="example: mllama-convert native-to-hf runs/tiny-cpu-3d hf/tiny --dtype bf16")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="dtype of the exported weights (default auto: the dtype the checkpoint's module weights are "
                        "stored in: fp32 for an fp32 run or conversion, bf16 for a bf16 run, whose fp32 masters are "
                        "then rounded once)")
    p.add_argument("--weights", choices=("masters", "module"), default=None,
                   help="masters (the default for ZeRO-1/2 checkpoints with optimizer state): the fp32 master "
                        "weights from the ZeRO optimizer files, rounded to --dtype once. module (the default "
                        "otherwise, e.g. for weights-only checkpoints): the module weights DeepSpeed saved (bf16 on "
                        "GPU runs, fp32 on CPU runs), cast to --dtype")
    p.add_argument("--tokenizer", help="tokenizer.model to export (default: the one the run used, from run.json)")
    p.add_argument("--max-shard-size", default="1GB",
                   help="largest safetensors file (default 1GB; one file is held in memory while it is written)")
    _common(p)

    p = sub.add_parser("meta-to-native", help="Meta params.json + consolidated.NN.pth -> native checkpoint",
                       description="Convert Meta's original LLaMA / Llama 2 / Llama 3.x checkpoint (model-parallel "
                       "shards consolidated.NN.pth + params.json, use_scaled_rope read as llama3 RoPE scaling) to a "
                       "weights-only native checkpoint. q/k rows are permuted from Meta's interleaved rotary pairs "
                       "to rotate-half.",
                       epilog="example: mllama-convert meta-to-native llama-2-7b ckpt/7b --tp 2 --pp 2 "
                              "--tokenizer tokenizer.model")
    p.add_argument("meta_dir")
    p.add_argument("out")
    _layout(p)
    p.add_argument("--tokenizer", help="tokenizer.model: SentencePiece (LLaMA 1/2) or tiktoken (Llama 3) "
                   "(default: META_DIR/tokenizer.model when it is there)")
    p.add_argument("--vocab-size", type=int, default=None, help="when params.json says vocab_size -1 (LLaMA-1)")
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="Llama 3.1+ params.json with use_scaled_rope but no rope_scaling_factor: 8 for Llama 3.1 / "
                        "3.3, 32 for Llama 3.2 1B/3B")
    _common(p, verify=False)  # no second implementation to compare with: the tests pin it to a reference

    from .reshard import EXAMPLES as reshard_examples, add_arguments as reshard_arguments
    p = sub.add_parser("reshard", help="native checkpoint -> another TP x PP x DP with its optimizer state",
                       description="Continue a run at another layout: the fp32 master weights, Adam moments and "
                       "step count, LR schedule and consumed samples of a ZeRO-1/2 checkpoint, for a new run with "
                       "train.save_dir=OUT (global batch kept).", epilog=reshard_examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    reshard_arguments(p)

    p = sub.add_parser("inspect", help="what a checkpoint directory holds, without loading tensors",
                       epilog="example: mllama-convert inspect runs/tiny-cpu-3d --tensors")
    p.add_argument("dir")
    p.add_argument("--tensors", action="store_true", help="list every parameter (shape, TP split, dtype)")

    p = sub.add_parser("verify", help="same tokens through two checkpoints (native or HF): logit differences",
                       description="Run the same fixed tokens through A and B (fp32, CPU, TP 1) and compare the "
                       "logits; exit status 1 when they differ by more than the bound (relative to the largest "
                       "logit): 1e-5 when both store weights in the same dtype, 3e-2 (bf16) or 5e-3 (fp16) when "
                       "one side holds rounded copies of the other's.",
                       epilog="example: mllama-convert verify runs/tiny-cpu-3d hf/tiny --tokens 64")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tokens", type=int, default=None,
                   help="sequence length of the fixed input (default 32; with RoPE scaling twice the original "
                        "context, so the scaled frequencies are reached)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="fail (exit 1) when the max relative logit difference exceeds it (default: the "
                        "dtype-aware bound above)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    if args.command == "reshard":
        from .reshard import run
        return run(args)
    from . import commands
    try:
        return commands.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was left behind", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Start-up chatter of megatron-core / DeepSpeed / transformers is not for the user's console."""
    import logging
    import os
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("DeepSpeed", "megatron", "megatron.core", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
