"""Bad input to every CLI: one ``error:`` line, status 2, no traceback, nothing written, and
before any work starts (in-process calls of the real ``main`` functions; no processes start)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "data" / "corpus.jsonl")


def _bench(*a):
    from launch.bench import main
    return main(list(a))


def _train(*a):
    from launch.train import main
    return main([str(ROOT / "configs" / "tiny-cpu-3d.yaml"), *a])


def _preprocess(*a):
    from megatron_llama.data.preprocess_cli import main
    return main(list(a))


def _tokenizer(*a):
    from megatron_llama.data.tokenizer_cli import main
    return main(list(a))


CASES = {  # name: (cli, argv with {file} / {dir} placeholders, words the error line must contain)
    "bench plan with 0 GPUs": (_bench, ["--plan", "--gpus", "0", "--out", "{dir}/p.json"], "--gpus"),
    "bench 0 sequences per step": (_bench, ["--plan", "--seqs-per-step", "0", "--out", "{dir}/p.json"],
                                   "--seqs-per-step"),
    "bench micro-batch 0": (_bench, ["--mbs", "0", "--out", "{dir}/b.json"], "--mbs"),
    "bench no micro-batch divides": (_bench, ["--mbs", "3", "--out", "{dir}/b.json"], "divides"),
    "bench layout tp0": (_bench, ["--layouts", "tp0pp1dp1", "--out", "{dir}/b.json"], "tp0pp1dp1"),
    "bench unknown checkpointing": (_bench, ["--checkpointing", "most", "--out", "{dir}/b.json"], "most"),
    "bench output under a file": (_bench, ["--plan", "--out", "{file}/p.json"], "is a file"),
    "train save_dir is a file": (_train, ["train.save_dir={file}"], "train.save_dir"),
    "train save_dir under a file": (_train, ["train.save_dir={file}/run"], "is a file"),
    "train negative restarts": (_train, ["train.max_restarts=-1"], "max_restarts"),
    "preprocess output under a file": (_preprocess, ["--input", CORPUS, "--tokenizer", "{file}",
                                                     "--output", "{file}/corpus"], "is a file"),
    "preprocess output is a directory": (_preprocess, ["--input", CORPUS, "--tokenizer", "{file}",
                                                       "--output", "{dir}"], "is a directory"),
    "preprocess 0 workers": (_preprocess, ["--input", CORPUS, "--tokenizer", "{file}", "--output",
                                           "{dir}/c", "--workers", "0"], "--workers"),
    "tokenizer output under a file": (_tokenizer, ["train", "--input", CORPUS, "--vocab-size", "300",
                                                   "--output", "{file}/tok"], "is a file"),
    "tokenizer vocabulary 0": (_tokenizer, ["train", "--input", CORPUS, "--vocab-size", "0",
                                            "--output", "{dir}/tok"], "vocab_size=0"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_status_2(name, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cli, argv, words = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = [a.format(file=blocker, dir=work) for a in argv]
    assert cli(*argv) == 2
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], captured.err
    assert "Traceback" not in captured.out + captured.err
    assert list(work.iterdir()) == [] and blocker.read_text() == "not a directory"  # nothing written
