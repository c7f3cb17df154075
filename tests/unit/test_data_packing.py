"""Packing into fixed-length rows and the hash-based train/validation split (no Ray)."""

from __future__ import annotations

import numpy as np

from lmaas.data.packing import Packer, pack, split_of


def test_pack_appends_eos_per_document_and_cuts_fixed_rows():
    rows = list(pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos_id=0))
    # stream: 1 2 3 0 | 4 5 0 6 | 7 8 9 0
    assert [r.tolist() for r in rows] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert all(r.dtype == np.int32 for r in rows)


def test_packer_drops_only_the_incomplete_tail():
    packer = Packer(block_size=8, eos_id=99)
    out = [packer.add(list(range(5))), packer.add(list(range(5)))]  # 12 tokens with EOS
    packer.finish()
    assert sum(len(o) for o in out) == 1
    assert packer.dropped == 4


def test_a_long_document_fills_several_rows():
    rows = list(pack([list(range(1, 21))], block_size=8, eos_id=0))
    assert len(rows) == 2  # 21 tokens -> 2 full rows, 5 dropped
    assert np.concatenate(rows).tolist() == list(range(1, 17))


def test_split_is_a_function_of_the_document_alone():
    docs = [f"document number {i}" for i in range(2000)]
    first = [split_of(d, 10.0) for d in docs]
    # adding other documents (and reordering) never moves a document
    more = docs[::-1] + [f"new {i}" for i in range(500)]
    again = {d: split_of(d, 10.0) for d in more}
    assert all(again[d] == s for d, s in zip(docs, first))
    share = first.count("validation") / len(first)
    assert 0.07 < share < 0.13


def test_split_edges():
    assert {split_of(f"d{i}", 0.0) for i in range(200)} == {"train"}
    assert split_of("x", 99.99) in ("train", "validation")


def test_extend_with_a_batch_stream_gives_the_rows_of_adding_each_document():
    from lmaas.data.packing import docs_to_stream

    docs = [list(range(1, n + 1)) for n in (3, 0, 7, 1, 12, 5)]
    one, batched = Packer(block_size=4, eos_id=0), Packer(block_size=4, eos_id=0)
    rows = np.concatenate([one.add(d) for d in docs])
    streamed = np.concatenate([batched.extend(docs_to_stream(docs[:2], 0)), batched.extend(docs_to_stream(docs[2:], 0))])
    one.finish(), batched.finish()
    assert rows.tolist() == streamed.tolist() and one.dropped == batched.dropped
