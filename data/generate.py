"""Regenerate the embedded data (deterministic): ``python data/generate.py``.

Writes data/corpus.jsonl (pretraining) and data/instructions.jsonl (supervised fine-tuning).
The generators live in megatron_llama/data/corpus_gen.py and instructions_gen.py so an installed
package can rebuild them too; tests check that they reproduce the committed files byte for byte.
"""
from megatron_llama.data import corpus_gen, instructions_gen

if __name__ == "__main__":
    corpus_gen.main([])
    instructions_gen.main([])
