"""Training data: every batch is a pure function of (seed, step).

A batch is a list of 1-D int64 token tensors of varying length whose lengths
add up to at most `tokens_per_step`; the same on every rank. A resumed run
asks for the same step and gets the same sequences.

- SyntheticRecall: a long-context recall task with long-tailed lengths. Each
  sequence starts with a random "needle" (NEEDLE_LEN tokens) after BOS, then
  filler drawn from a skewed (learnable) distribution, and ends by repeating
  the needle after a QUERY marker. Predicting the repeat needs attention
  reaching back over the whole sequence; `recall_mask` marks those targets
  so the training loop can report their loss separately.
- JsonlText: {"text": ...} per line, tokenised once, documents cut to
  seq_len_max, visited in a seeded per-epoch shuffle.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dist.models.tokenizer import ByteTokenizer

BOS = ByteTokenizer.bos_id                  # needle and filler tokens are bytes [0, 256)
QUERY = ByteTokenizer.vocab_size            # one id past the byte tokenizer's: "repeat the needle now"
NEEDLE_LEN = 8


@dataclass
class Batch:
    seqs: list[torch.Tensor]           # each [len] int64 tokens
    recall_masks: list[torch.Tensor]   # each [len - 1] bool: targets that are needle recalls

    @property
    def num_targets(self) -> int:
        return sum(len(s) - 1 for s in self.seqs)


def _fill_lengths(rng: np.random.Generator, tokens_per_step: int, lo: int, hi: int, draw) -> list[int]:
    lengths, total = [], 0
    while True:
        n = int(draw(rng))
        n = max(lo, min(hi, n))
        if total + n > tokens_per_step:
            rest = tokens_per_step - total
            if rest >= lo:
                lengths.append(rest)
            return lengths or [min(hi, tokens_per_step)]
        lengths.append(n)
        total += n


class SyntheticRecall:
    """Long-tailed lengths (log-normal, clipped to [seq_len_min, seq_len_max])."""

    def __init__(self, *, seed: int, seq_len_min: int, seq_len_max: int, tokens_per_step: int,
                 vocab_size: int):
        if vocab_size <= QUERY:
            raise ValueError(f"synthetic data needs vocab_size > {QUERY}, got {vocab_size}")
        if seq_len_min < 2 * NEEDLE_LEN + 3:
            raise ValueError(f"data.seq_len_min must be >= {2 * NEEDLE_LEN + 3} for the recall task")
        self.seed, self.lo, self.hi, self.tokens_per_step = seed, seq_len_min, seq_len_max, tokens_per_step
        # Skewed filler distribution over 256 byte tokens: learnable, so the loss visibly falls.
        ranks = np.arange(1, 257, dtype=np.float64)
        self.filler_p = (1 / ranks) / (1 / ranks).sum()
        # Median length ~ geometric mean of the range; heavy right tail.
        self.mu = 0.5 * (np.log(seq_len_min) + np.log(seq_len_max)) - 0.5
        self.sigma = max(0.3, (np.log(seq_len_max) - np.log(seq_len_min)) / 3)

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step, 0xDA7A])
        lengths = _fill_lengths(rng, self.tokens_per_step, self.lo, self.hi,
                                lambda r: r.lognormal(self.mu, self.sigma))
        seqs, masks = [], []
        for n in lengths:
            needle = rng.integers(0, 256, NEEDLE_LEN)
            filler = rng.choice(256, size=n - 2 * NEEDLE_LEN - 2, p=self.filler_p)
            toks = np.concatenate([[BOS], needle, filler, [QUERY], needle]).astype(np.int64)
            mask = np.zeros(n - 1, dtype=bool)
            mask[n - 1 - NEEDLE_LEN:] = True        # targets = toks[1:]; the last NEEDLE_LEN are recalls
            seqs.append(torch.from_numpy(toks))
            masks.append(torch.from_numpy(mask))
        return Batch(seqs, masks)


class JsonlText:
    """Documents from a JSONL file ({"text": ...} per line), tokenised once."""

    def __init__(self, path: str, tokenizer, *, seed: int, seq_len_max: int, tokens_per_step: int):
        if not os.path.isfile(path):
            raise ValueError(f"data.path: dataset file not found: {path}")
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"data.path: {path}:{lineno} is not a JSON object with a \"text\" field") from None
                ids = tokenizer.encode(text, add_bos=True)[: seq_len_max - 1] + [tokenizer.eos_id]
                if len(ids) >= 2:
                    docs.append(torch.tensor(ids, dtype=torch.int64))
        if not docs:
            raise ValueError(f"data.path: {path} holds no documents")
        self.docs, self.seed, self.tokens_per_step = docs, seed, tokens_per_step
        self._order: list[int] = []   # doc indices of epochs laid end to end, extended on demand
        self._starts = [0]            # batch b takes _order[_starts[b]:_starts[b + 1]]

    def _epoch(self, e: int) -> list[int]:
        return np.random.default_rng([self.seed, e, 0x7E47]).permutation(len(self.docs)).tolist()

    def batch(self, step: int) -> Batch:
        while len(self._starts) <= step + 1:
            i, total = self._starts[-1], 0
            while True:
                while i >= len(self._order):
                    self._order += self._epoch(len(self._order) // len(self.docs))
                n = len(self.docs[self._order[i]])
                if total + n > self.tokens_per_step and total > 0:
                    break
                total += n
                i += 1
            self._starts.append(i)
        seqs = [self.docs[j] for j in self._order[self._starts[step]:self._starts[step + 1]]]
        return Batch(seqs, [torch.zeros(len(s) - 1, dtype=torch.bool) for s in seqs])


IGNORE = -100  # the label of a position with no target (padding): cross_entropy's ignore_index


def pack(seqs: list[torch.Tensor], recall_masks: list[torch.Tensor], multiple: int = 1):
    """The model's inputs for `seqs` packed one after another, each padded at its end to a multiple of
    `multiple` (what an SP layout needs: 2 x degree for zigzag); padding is causally after every real
    token, so it changes nothing they compute, and its labels are IGNORE.

    seqs: [len_i] tokens; recall_masks: [len_i - 1] bool. Returns (inputs, labels, positions, recall)
    [total] each (positions restart at 0 for every sequence) and cu_seqlens int32 [n + 1].
    """
    inputs, labels, positions, recall, lengths = [], [], [], [], []
    for seq, mask in zip(seqs, recall_masks):
        n = len(seq) - 1
        pad = -n % multiple
        inputs.append(F.pad(seq[:-1], (0, pad)))
        labels.append(F.pad(seq[1:], (0, pad), value=IGNORE))
        positions.append(torch.arange(n + pad))
        recall.append(F.pad(mask, (0, pad)))
        lengths.append(n + pad)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return (*(torch.cat(x) for x in (inputs, labels, positions, recall)), cu)


def make_dataset(cfg, vocab_size: int, tokenizer=None):
    """The dataset a config names (cfg: dist.config.Config)."""
    d = cfg.data
    if d.kind == "synthetic":
        return SyntheticRecall(seed=cfg.train.seed, seq_len_min=d.seq_len_min, seq_len_max=d.seq_len_max,
                               tokens_per_step=d.tokens_per_step, vocab_size=vocab_size)
    return JsonlText(d.path, tokenizer, seed=cfg.train.seed, seq_len_max=d.seq_len_max,
                     tokens_per_step=d.tokens_per_step)


def split_for_dp(lengths: list[int], dp: int) -> list[list[int]]:
    """Deal sequence indices to `dp` ranks, balancing tokens (longest first onto the lightest rank).

    Deterministic: ties break by rank index. A rank may get no sequence when
    there are fewer sequences than ranks.
    """
    loads = [0] * dp
    parts: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(dp), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += lengths[i]
    return [sorted(p) for p in parts]
