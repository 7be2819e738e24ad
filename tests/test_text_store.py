"""The text feature store: write, interrupt and resume, read through views, detect corruption.

The encoder here is a small deterministic stand-in (states computed from the text, counting calls):
the store only needs `identity`, `hidden_size`, `device` and `encode`; the real encoder against the
store is tested in test_text_encoders.py.
"""

import hashlib
import pickle
import warnings

import numpy as np
import pytest
import torch

from vkd_pyro.data.text_store import (
    ARRAY_FILE,
    INDEX_FILE,
    TextFeatureStore,
    TokenStates,
    entry_key,
    store_folder,
)

WIDTH, MAX_TOKENS = 6, 16


class CountingEncoder:
    """States (n, WIDTH) with n = words + 2 (at most MAX_TOKENS), values derived from the text."""

    identity, hidden_size, device = "counting-encoder", WIDTH, torch.device("cpu")

    def __init__(self, fail_after_calls=None):
        self.encoded: list[str] = []
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    @staticmethod
    def states(text: str) -> torch.Tensor:
        n = min(len(text.split()) + 2, MAX_TOKENS)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)).half()

    def encode(self, texts, max_tokens, batch_size, device=None, progress=None):
        assert max_tokens == MAX_TOKENS
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt
        self.calls += 1
        self.encoded += list(texts)
        if progress is not None:
            progress(len(texts))
        return [self.states(t) for t in texts]


TEXTS = [" ".join(["word"] * (i % 9) + [f"report{i}"]) for i in range(23)]


def store_in(tmp_path) -> TextFeatureStore:
    return TextFeatureStore(store_folder(tmp_path, CountingEncoder.identity, MAX_TOKENS),
                            CountingEncoder.identity, MAX_TOKENS, WIDTH)


def check(view: TokenStates, texts) -> None:
    assert len(view) == len(texts)
    assert view.lengths.tolist() == [CountingEncoder.states(t).shape[0] for t in texts]
    for i, t in enumerate(texts):
        got = view[i]
        assert got.dtype == torch.float16 and torch.equal(got, CountingEncoder.states(t))


def test_write_then_read_from_a_fresh_store(tmp_path):
    enc = CountingEncoder()
    texts = TEXTS + [TEXTS[3], TEXTS[0]]  # duplicates are encoded once
    view, report = store_in(tmp_path).get_or_compute(enc, texts, chunk=5)
    assert sorted(enc.encoded) == sorted(TEXTS) and enc.calls == 5  # 23 texts in chunks of 5
    assert report.reports == 23 and report.tokens == sum(CountingEncoder.states(t).shape[0] for t in TEXTS)
    assert "reports/s" in str(report) and "tokens/s" in str(report)
    check(view, texts)

    # A fresh store object reads the files: nothing is encoded again, in any order.
    again = CountingEncoder()
    fresh, report = store_in(tmp_path).get_or_compute(again, list(reversed(texts)))
    assert again.calls == 0 and report is None
    check(fresh, list(reversed(texts)))
    folder = store_folder(tmp_path, CountingEncoder.identity, MAX_TOKENS)
    rows = int(fresh.lengths.sum() - fresh.lengths[0] - fresh.lengths[1])  # without the two duplicates
    assert (folder / ARRAY_FILE).stat().st_size == rows * WIDTH * 2

    # Only the missing texts are encoded; the entry key is that of (identity, max_tokens, text).
    more = CountingEncoder()
    store = store_in(tmp_path)
    view, _ = store.get_or_compute(more, ["a new report", TEXTS[1]])
    assert more.encoded == ["a new report"]
    check(view, ["a new report", TEXTS[1]])
    assert store.rows_of([entry_key(CountingEncoder.identity, MAX_TOKENS, "a new report"),
                          entry_key(CountingEncoder.identity, MAX_TOKENS + 1, "a new report")]).tolist() == [23, -1]


def test_interrupted_encoding_keeps_finished_chunks_and_resumes(tmp_path):
    enc = CountingEncoder(fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        store_in(tmp_path).get_or_compute(enc, TEXTS, chunk=4)
    assert len(store_in(tmp_path)) == 8  # two committed chunks
    # A chunk whose rows reached the array but whose index was never committed.
    folder = store_folder(tmp_path, CountingEncoder.identity, MAX_TOKENS)
    with open(folder / ARRAY_FILE, "ab") as handle:
        handle.write(b"\x01" * (WIDTH * 2 * 5 + 3))
    resumed = CountingEncoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unfinished chunk is not corruption: no warning
        view, report = store_in(tmp_path).get_or_compute(resumed, TEXTS, chunk=4)
    assert sorted(resumed.encoded) == sorted(TEXTS[8:]) and report.reports == 15
    check(view, TEXTS)
    assert (folder / ARRAY_FILE).stat().st_size == int(view.lengths.sum()) * WIDTH * 2  # leftover cut off


@pytest.mark.parametrize("damage, bad_file", [
    ("truncate_array", ARRAY_FILE),
    ("garbage_index", INDEX_FILE),
    ("shuffled_offsets", INDEX_FILE),
])
def test_corrupt_store_is_rebuilt_with_a_warning_naming_the_file(tmp_path, damage, bad_file):
    store_in(tmp_path).get_or_compute(CountingEncoder(), TEXTS, chunk=10)
    folder = store_folder(tmp_path, CountingEncoder.identity, MAX_TOKENS)
    if damage == "truncate_array":
        with open(folder / ARRAY_FILE, "r+b") as handle:
            handle.truncate((folder / ARRAY_FILE).stat().st_size - WIDTH * 2)
    elif damage == "garbage_index":
        (folder / INDEX_FILE).write_bytes(b"not an index")
    else:
        index = np.load(folder / INDEX_FILE)
        index["offset"] = index["offset"][::-1]
        np.save(folder / INDEX_FILE, index)
    enc = CountingEncoder()
    with pytest.warns(UserWarning, match=f"{bad_file}.*rebuilding"):
        view, report = store_in(tmp_path).get_or_compute(enc, TEXTS)
    assert sorted(enc.encoded) == sorted(TEXTS) and report.reports == len(TEXTS)
    check(view, TEXTS)


def test_store_of_another_width_is_rebuilt_and_encoder_must_match(tmp_path):
    store_in(tmp_path).get_or_compute(CountingEncoder(), TEXTS[:3])
    folder = store_folder(tmp_path, CountingEncoder.identity, MAX_TOKENS)
    with pytest.warns(UserWarning, match="meta.json belongs to another"):
        other = TextFeatureStore(folder, CountingEncoder.identity, MAX_TOKENS, WIDTH + 1)
    assert len(other) == 0 and not (folder / ARRAY_FILE).exists()
    with pytest.raises(ValueError, match="another encoder"):
        other.get_or_compute(CountingEncoder(), TEXTS[:1])


def test_view_pickles_without_the_array_and_reads_in_a_worker(tmp_path):
    view, _ = store_in(tmp_path).get_or_compute(CountingEncoder(), TEXTS)
    view[0]  # opens the file in this process
    blob = pickle.dumps(view)
    assert len(blob) < 2000  # path, offsets and lengths only: 23 records
    copy = pickle.loads(blob)
    assert copy._fd is None
    check(copy, TEXTS)
    loader = torch.utils.data.DataLoader(range(len(TEXTS)), batch_size=None, num_workers=1,
                                         collate_fn=lambda i: view[i], multiprocessing_context="fork")
    for i, states in enumerate(loader):
        assert torch.equal(states, CountingEncoder.states(TEXTS[i]))


@pytest.mark.parametrize("opened", [False, True])
def test_view_of_a_store_truncated_after_opening_says_so(tmp_path, opened):
    view, _ = store_in(tmp_path).get_or_compute(CountingEncoder(), TEXTS)
    if opened:
        view[0]
    folder = store_folder(tmp_path, CountingEncoder.identity, MAX_TOKENS)
    with open(folder / ARRAY_FILE, "r+b") as handle:
        handle.truncate(10)
    from vkd_pyro.errors import UserError

    with pytest.raises(UserError, match=f"{ARRAY_FILE}.*truncated"):
        view[len(TEXTS) - 1]
