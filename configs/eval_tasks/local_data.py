"""``custom_dataset`` of the task YAMLs here: a JSONL file next to this module as the ``test`` split.

lm-eval passes ``dataset_kwargs`` (``file: NAME.jsonl``) to the function; the path is resolved
against this directory, not the working directory, and nothing is looked up on the Hub.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(file: str, **_metadata):
    import datasets
    import json
    with open(HERE / file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
