import json

import pytest
import torch

from dist.config import load_config
from dist.data import NEEDLE_LEN, QUERY, JsonlText, SyntheticRecall, make_dataset, split_for_dp


def test_synthetic_is_pure_function_of_seed_and_step():
    kw = dict(seq_len_min=32, seq_len_max=400, tokens_per_step=2000, vocab_size=512)
    a, b = SyntheticRecall(seed=1, **kw), SyntheticRecall(seed=1, **kw)
    b.batch(5)  # visiting other steps first changes nothing
    for step in (0, 3, 7):
        x, y = a.batch(step), b.batch(step)
        assert all(torch.equal(s, t) for s, t in zip(x.seqs, y.seqs))
    assert not torch.equal(a.batch(0).seqs[0], a.batch(1).seqs[0])
    assert not torch.equal(a.batch(0).seqs[0], SyntheticRecall(seed=2, **kw).batch(0).seqs[0])


def test_synthetic_shape_of_task():
    data = SyntheticRecall(seed=0, seq_len_min=32, seq_len_max=500, tokens_per_step=5000, vocab_size=512)
    lengths = []
    for step in range(20):
        batch = data.batch(step)
        assert sum(len(s) for s in batch.seqs) <= 5000
        for s, m in zip(batch.seqs, batch.recall_masks):
            assert 32 <= len(s) <= 500 and len(m) == len(s) - 1
            assert int(s.max()) < 512
            # the needle after BOS is repeated after QUERY, and exactly those targets are marked
            assert torch.equal(s[1:1 + NEEDLE_LEN], s[-NEEDLE_LEN:]) and s[-NEEDLE_LEN - 1] == QUERY
            assert torch.equal(s[1:][m], s[-NEEDLE_LEN:])
            lengths.append(len(s))
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert lengths.max() > 2 * lengths.median()  # long tail


def test_jsonl(tmp_path):
    from dist.models import ByteTokenizer

    path = tmp_path / "d.jsonl"
    docs = [{"text": "x" * n} for n in (5, 40, 17, 90, 3, 64, 8)]
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    tok = ByteTokenizer()
    data = JsonlText(str(path), tok, seed=0, seq_len_max=64, tokens_per_step=128)
    seen = []
    for step in range(6):
        batch = data.batch(step)
        assert batch.seqs and sum(len(s) for s in batch.seqs) <= 128 or len(batch.seqs) == 1
        assert all(len(s) <= 64 for s in batch.seqs)
        seen += [len(s) for s in batch.seqs]
    # the first epoch visits every document exactly once
    expected = sorted(min(n + 2, 64) for n in (5, 40, 17, 90, 3, 64, 8))
    assert sorted(seen[:7]) == expected
    again = JsonlText(str(path), tok, seed=0, seq_len_max=64, tokens_per_step=128)
    assert all(torch.equal(a, b) for a, b in zip(again.batch(4).seqs, data.batch(4).seqs))


def test_jsonl_errors(tmp_path):
    from dist.models import ByteTokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        JsonlText(str(bad), ByteTokenizer(), seed=0, seq_len_max=64, tokens_per_step=128)
    with pytest.raises(ValueError, match="not found"):
        JsonlText(str(tmp_path / "none.jsonl"), ByteTokenizer(), seed=0, seq_len_max=64, tokens_per_step=128)


def test_split_for_dp_balances_and_covers():
    lengths = [100, 5, 60, 60, 30, 1, 250]
    parts = split_for_dp(lengths, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) == 250  # the longest sequence alone; the rest fit beside
    assert split_for_dp([7], 2) == [[0], []]


def test_make_dataset_from_config():
    cfg = load_config(None, ["data.seq_len_max=256", "data.tokens_per_step=1024"])
    assert isinstance(make_dataset(cfg, 512), SyntheticRecall)


def test_pack_pads_each_sequence_to_the_layout_multiple():
    from dist.data import IGNORE, pack

    seqs = [torch.arange(10, 16), torch.arange(20, 23)]             # 5 and 2 targets
    masks = [torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool), torch.tensor([0, 1], dtype=torch.bool)]
    inputs, labels, positions, recall, cu = pack(seqs, masks, multiple=4)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 8, 12]
    assert inputs.tolist() == [10, 11, 12, 13, 14, 0, 0, 0, 20, 21, 0, 0]
    assert labels.tolist() == [11, 12, 13, 14, 15] + [IGNORE] * 3 + [21, 22] + [IGNORE] * 2
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert recall.tolist() == [False] * 3 + [True] * 2 + [False] * 4 + [True] + [False] * 2
    assert pack(seqs, masks)[4].tolist() == [0, 5, 7]                # multiple 1: no padding
