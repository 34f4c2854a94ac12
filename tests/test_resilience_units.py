"""Exit statuses, the hang watchdog's decision, checkpoint checksums and pruning (one process)."""
import json
import signal

from launch import exit_codes
from launch.faults import Fault, Faults, parse
from launch.watchdog import Heartbeat
from megatron_llama.checkpoint import integrity
from megatron_llama.checkpoint.directory import candidates, prune


def test_exit_statuses_and_what_a_supervisor_does_with_them():
    assert [exit_codes.should_restart(s) for s in (0, 1, 2, 3, 4, 143)] == [False, True, False, True, False, False]
    assert exit_codes.from_returncode(-signal.SIGKILL) == exit_codes.FAILED  # killed: nothing was saved
    assert exit_codes.from_returncode(143) == 143 and exit_codes.for_signal(signal.SIGUSR1) == 138
    assert exit_codes.describe(138) == "stopped by SIGUSR1" and exit_codes.describe(3) == "hang detected"
    for status in ("0 ", "1 ", "2 ", "3 ", "4 ", "128+N"):
        assert f"\n  {status}" in "\n" + exit_codes.HELP


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def test_watchdog_reports_rank_step_and_phase_only_after_the_timeout():
    clock, lines = Clock(), []
    heart = Heartbeat(rank=3, timeout_s=30, clock=clock, on_hang=lines.append)
    heart.beat(17, "data")
    clock.t += 29
    assert not heart.check()
    heart.beat(17, "step")  # progress restarts the clock
    clock.t += 29.5
    assert not heart.check() and lines == []
    clock.t += 1
    assert heart.check()
    assert "rank 3 made no progress for 30 s at step 17 (phase: step)" in lines[0] and "status 3" in lines[0]
    off = Heartbeat(rank=0, timeout_s=0, clock=clock, on_hang=lines.append)
    clock.t += 1e6
    assert not off.check()


def test_fault_specs_are_scoped_to_rank_attempt_and_requeue():
    assert parse("kill:rank=1:step=3:attempt=0,stall:rank=0:step=5") == [Fault("kill", 1, 3, 0), Fault("stall", 0, 5)]
    env = {"MLLAMA_FAULT": "kill:rank=1:step=3:attempt=0,term:rank=1:step=4:restart=1", "MLLAMA_ATTEMPT": "1"}
    assert Faults(1, env=env).faults == []
    assert Faults(1, env=dict(env, SLURM_RESTART_COUNT="1")).faults == [Fault("term", 1, 4, restart=1)]


def _fake_checkpoint(root, step, payload=b"x" * 1000):
    d = root / f"step{step:07d}"
    (d / "sub").mkdir(parents=True)
    (d / "model.pt").write_bytes(payload)
    (d / "sub" / "optim.pt").write_bytes(payload[::-1] + b"y")
    files = integrity.manifest(d)
    (d / "run.json").write_text(json.dumps({"step": step, "files": files}))
    return d


def test_checksums_find_missing_truncated_and_flipped_files(tmp_path):
    d = _fake_checkpoint(tmp_path, 1, bytes(range(256)) * 8)
    files = json.loads((d / "run.json").read_text())["files"]
    assert sorted(files) == ["model.pt", "sub/optim.pt"] and files["model.pt"][0] == 2048
    assert integrity.verify(d, files) is None and integrity.verify(d, None) is None
    data = bytearray((d / "model.pt").read_bytes())
    data[100] ^= 1
    (d / "model.pt").write_bytes(bytes(data))
    assert integrity.check_sizes(d, files) is None  # same size: only the checksum sees it
    assert integrity.verify(d, files) == "model.pt has a wrong checksum"
    (d / "sub" / "optim.pt").write_bytes(b"short")
    assert integrity.verify(d, files) == "sub/optim.pt has 5 bytes, 2049 were written"
    (d / "sub" / "optim.pt").unlink()
    assert integrity.verify(d, files) == "sub/optim.pt is missing"


def test_pruning_never_deletes_the_newest_intact_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step0000008")
    for step in (6, 8):  # both newest ones damaged (truncated shards)
        (tmp_path / f"step{step:07d}" / "model.pt").write_bytes(b"")
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step0000004", "step0000006", "step0000008"]
    assert [p.name for p in candidates(str(tmp_path))] == ["step0000008", "step0000006", "step0000004"]


def test_crc32_of_ranges_read_in_parallel_is_zlibs(tmp_path, monkeypatch):
    """crc32.py hashes a file's ranges in threads and joins them with crc32_combine: zlib's CRC of
    the whole file, for files shorter than, equal to and longer than a range, and empty ones."""
    import random
    import zlib

    from megatron_llama.checkpoint import crc32
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randbytes(rng.randrange(0, 200)), rng.randbytes(rng.randrange(0, 200))
        assert crc32.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    monkeypatch.setattr(crc32, "CHUNK", 1000)
    sizes = [0, 1, 999, 1000, 1001, 12345]
    paths = []
    for n in sizes:
        paths.append(tmp_path / f"f{n}")
        paths[-1].write_bytes(rng.randbytes(n))
    for threads in (1, 3):
        assert crc32.crc32_files(paths, threads) == {p: zlib.crc32(p.read_bytes()) for p in paths}


def test_checkpoint_saves_skip_torchs_zip_crc_and_restore_it(tmp_path):
    """integrity.without_zip_crc: torch.save writes CRC 0 for every record while any caller is
    inside (nested, and in another thread), the setting comes back afterwards, and the file still
    loads; a flipped byte is what run.json's table catches (torch.load does not)."""
    import threading
    import zipfile

    import torch

    from megatron_llama.checkpoint import integrity
    t = torch.arange(4096, dtype=torch.float32)

    def crcs(path):
        return {i.CRC for i in zipfile.ZipFile(path).infolist()}

    def save_inside(name):
        with integrity.without_zip_crc():
            with integrity.without_zip_crc():
                pass
            torch.save({"t": t}, tmp_path / name)  # still inside after a nested block ended

    writer = threading.Thread(target=save_inside, args=("w.pt",))  # as the asynchronous writer
    writer.start()
    save_inside("a.pt")
    writer.join()
    assert torch.serialization.get_crc32_options() is True
    torch.save({"t": t}, tmp_path / "b.pt")
    assert crcs(tmp_path / "w.pt") == {0}
    assert crcs(tmp_path / "a.pt") == {0} and 0 not in crcs(tmp_path / "b.pt")
    assert torch.equal(torch.load(tmp_path / "a.pt")["t"], t)
    table = integrity.manifest(tmp_path, collective=False)
    data = bytearray((tmp_path / "a.pt").read_bytes())
    data[data.find(t[100:102].numpy().tobytes())] ^= 0xFF
    (tmp_path / "a.pt").write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / "a.pt")["t"], t)  # why the table is needed
    assert integrity.verify(tmp_path, table) == "a.pt has a wrong checksum"
