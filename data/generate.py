"""Regenerate the embedded data (deterministic): ``python data/generate.py``.

Writes data/corpus.jsonl (pretraining), data/instructions.jsonl (supervised fine-tuning) and
data/preferences.jsonl (reward models / DPO, built from the instructions).
The generators live in megatron_llama/data/corpus_gen.py and instructions_gen.py so an installed
package can rebuild them too; tests check that they reproduce the committed files byte for byte.
"""
from megatron_llama.data import corpus_gen, instructions_gen, preferences_gen

if __name__ == "__main__":
    corpus_gen.main([])
    instructions_gen.main([])
    preferences_gen.main([])
