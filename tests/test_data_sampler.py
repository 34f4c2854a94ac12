"""The sampler is a pure function of (seed, consumed samples, rank, world): property tests."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from megatron_llama.data import MicroBatchIterator, batch_indices
from megatron_llama.data.sampler import permute

layouts = st.tuples(st.integers(1, 200), st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 8))


def global_batch(n, seed, consumed, dp, mbs):
    """Indices of one global batch, as the DP ranks read them, rank after rank."""
    return [batch_indices(n, seed, consumed, r, dp, mbs) for r in range(dp)]


@settings(max_examples=100, deadline=None)
@given(layouts, st.integers(0, 50))
def test_dp_ranks_read_disjoint_samples(layout, step):
    n, seed, dp, mbs = layout
    gbs = dp * mbs
    consumed = step * gbs
    per_rank = global_batch(n, seed, consumed, dp, mbs)
    assert all(len(b) == mbs and all(0 <= i < n for i in b) for b in per_rank)
    flat = [i for b in per_rank for i in b]
    if consumed // n == (consumed + gbs - 1) // n:  # batch inside one epoch: all distinct
        assert len(set(flat)) == gbs
    # in every case: rank r's slice is positions [consumed + r*mbs, +mbs) of the stream
    stream = [permute(np.array([p % n]), n, seed, p // n)[0] for p in range(consumed, consumed + gbs)]
    assert flat == stream


@settings(max_examples=50, deadline=None)
@given(layouts, st.integers(0, 3))
def test_every_sample_of_an_epoch_served_exactly_once(layout, epoch):
    n, seed, dp, mbs = layout
    gbs = dp * mbs
    served: dict[int, list[int]] = {}
    first_step, last_step = epoch * n // gbs, ((epoch + 1) * n - 1) // gbs
    for step in range(first_step, last_step + 1):
        for r, batch in enumerate(global_batch(n, seed, step * gbs, dp, mbs)):
            for k, idx in enumerate(batch):
                pos = step * gbs + r * mbs + k
                served.setdefault(pos // n, []).append(idx)
    assert sorted(served[epoch]) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(layouts, st.integers(0, 12), st.integers(1, 4))
def test_resume_continues_with_the_uninterrupted_batch(layout, steps_before, steps_after):
    n, seed, dp, mbs = layout
    data = TinyWindows(n)
    for rank in range(dp):
        full = MicroBatchIterator(data, seed, 0, rank, dp, mbs)
        for _ in range(steps_before):
            next(full)
        saved = full.state_dict()["consumed_samples"]
        assert saved == steps_before * dp * mbs
        resumed = MicroBatchIterator(data, seed, saved, rank, dp, mbs)  # "after a restart"
        for _ in range(steps_after):
            (a, la), (b, lb) = next(full), next(resumed)
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_reshuffled_each_epoch_and_by_seed():
    n = 64
    epoch0 = batch_indices(n, 7, 0, 0, 1, n)
    epoch1 = batch_indices(n, 7, n, 0, 1, n)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    assert batch_indices(n, 8, 0, 0, 1, n) != epoch0
    assert batch_indices(n, 7, 0, 0, 1, n) == epoch0  # pure


def test_permutation_large_and_cheap():
    n = 10_000_019  # prime, far from a power of 4: exercises cycle walking
    pos = np.arange(0, n, 997)
    out = permute(pos, n, 1, 0)
    assert len(np.unique(out)) == len(pos) and out.min() >= 0 and out.max() < n


class TinyWindows:
    """Window i = [i*10, i*10+1, ...]: labels must be tokens shifted by one."""

    def __init__(self, n, seq_len=5):
        self.n, self.seq_len = n, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.arange(i * 10, i * 10 + self.seq_len + 1, dtype=np.int64)


def test_micro_batch_shapes_and_labels():
    it = MicroBatchIterator(TinyWindows(10), seed=0, consumed_samples=0, dp_rank=1, dp_size=2,
                            micro_batch_size=3)
    tokens, labels = next(it)
    assert tokens.shape == labels.shape == (3, 5) and tokens.dtype == labels.dtype == torch.int64
    assert torch.equal(labels[:, :-1], tokens[:, 1:]) and torch.equal(labels[:, -1], tokens[:, -1] + 1)
    assert it.consumed_samples == 6
    assert (tokens[:, 0] // 10).tolist() == batch_indices(10, 0, 0, 1, 2, 3)
