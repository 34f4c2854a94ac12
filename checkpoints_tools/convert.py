"""``mllama-convert``: checkpoint conversion (not implemented yet).

Planned: Hugging Face <-> native, Meta -> native, TP/PP resharding, inspect. The weight mapping
it will use already exists and is tested against transformers: megatron_llama/model/hf_mapping.py
(names and fused layouts) and megatron_llama/model/layout.py (TP shard/unshard).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mllama-convert", description=__doc__.split("\n\n")[0],
                                epilog="Not yet: no conversion is performed by this version.")
    p.add_argument("command", nargs="?", choices=["hf-to-native", "native-to-hf", "meta-to-native",
                                                  "reshard", "inspect"])
    p.parse_args(argv)
    print("mllama-convert: not implemented yet (see checkpoints_tools/convert.py)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
