"""Regenerate data/corpus.jsonl (deterministic): ``python data/generate.py``.

The generator lives in megatron_llama/data/corpus_gen.py so an installed package can rebuild
the corpus too; tests check that it reproduces the committed file byte for byte.
"""
from megatron_llama.data.corpus_gen import main

if __name__ == "__main__":
    main()
