"""Erasure codes across the hosts of a parity group, with rotated parity placement.

A group has G members (one rank per host, the same local rank on each). Every
member's snapshot blob is split into k = G - m pieces; stripe j (j = 0..G-1)
holds one piece of each of k members plus m parity blocks, stored on members
j, j+1, ..., j+m-1 (rotated, as RAID-5 rotates its parity disk), so every
member stores k data pieces and m parity blocks and every stripe has exactly
one block on each member. Losing any m members loses at most m blocks of
every stripe: each stripe, and so every blob, is rebuilt from the k that
remain.

    code = make_code("xor", group_size)          # "xor" (m=1) | "rs2" (m=2, zfec) | "none"
    parity = encode_group(blobs, code)           # parity[j]: the m blocks member j stores
    blobs = rebuild_group(maybe_blobs, maybe_parity, nbytes, code)   # None marks a lost member

Memory per member: blob + m * ceil(blob / k) bytes of parity. The snapshot
engine (dist.fault.snapshot) moves the same pieces between ranks with
torch.distributed; the functions here are the math, on numpy uint8 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 20  # XOR in 1 MiB slices so the accumulator stays in cache


class TooManyLosses(ValueError):
    """More members of a group lost than its code tolerates."""


def xor_into(acc: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """acc[:] = XOR of `blocks` (all uint8 of acc's length), chunked; returns acc."""
    n = len(acc)
    words = n - n % 8
    a64 = acc[:words].view(np.uint64)
    b64 = [b[:words].view(np.uint64) for b in blocks]
    step = CHUNK // 8
    for lo in range(0, len(a64), step):
        sl = slice(lo, lo + step)
        np.copyto(a64[sl], b64[0][sl])
        for b in b64[1:]:
            np.bitwise_xor(a64[sl], b[sl], out=a64[sl])
    if words < n:  # the tail that is not a whole word
        acc[words:] = blocks[0][words:]
        for b in blocks[1:]:
            np.bitwise_xor(acc[words:], b[words:], out=acc[words:])
    return acc


def _zfec():
    try:
        import zfec
    except ImportError:
        raise ValueError("config key 'fault.parity' = \"rs2\" needs zfec: pip install 'dist[fault]'") from None
    return zfec


@dataclass(frozen=True)
class Code:
    """An (k + m, k) code over equal-length pieces: encode k pieces into m parity blocks, decode any k."""

    name: str
    group_size: int  # G
    m: int           # losses tolerated per group

    @property
    def k(self) -> int:
        return self.group_size - self.m

    def encode(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """k data pieces -> m parity blocks."""
        if self.m == 0:
            return []
        if self.name == "xor":
            return [xor_into(np.empty_like(pieces[0]), pieces)]
        zfec = _zfec()
        return [np.frombuffer(p, dtype=np.uint8) for p in
                zfec.Encoder(self.k, self.k + self.m).encode(tuple(pieces), tuple(range(self.k, self.k + self.m)))]

    def decode(self, blocks: dict[int, np.ndarray]) -> list[np.ndarray]:
        """{block number: block} with at least k entries (0..k-1 data, k.. parity) -> the k data pieces."""
        if len(blocks) < self.k:
            raise TooManyLosses(f"{self.name}: {len(blocks)} of {self.k + self.m} blocks left, {self.k} needed")
        if all(i in blocks for i in range(self.k)):
            return [blocks[i] for i in range(self.k)]
        if self.name == "xor":  # one data piece missing: XOR of everything else
            missing = next(i for i in range(self.k) if i not in blocks)
            out = {i: b for i, b in blocks.items()}
            out[missing] = xor_into(np.empty_like(blocks[self.k]), [b for b in blocks.values()])
            return [out[i] for i in range(self.k)]
        zfec = _zfec()
        nums = tuple(sorted(blocks)[: self.k])
        data = zfec.Decoder(self.k, self.k + self.m).decode(tuple(blocks[i] for i in nums), nums)
        return [np.frombuffer(d, dtype=np.uint8) if not isinstance(d, np.ndarray) else d for d in data]

    # ------------------------------------------------------------ rotated placement

    def holders(self, stripe: int) -> list[int]:
        """Members storing the parity blocks of `stripe` (block k + t on holders[t])."""
        return [(stripe + t) % self.group_size for t in range(self.m)]

    def data_members(self, stripe: int) -> list[int]:
        """Members whose pieces make up `stripe`, in block order 0..k-1."""
        held = set(self.holders(stripe))
        return [h for h in range(self.group_size) if h not in held]

    def piece_of(self, member: int, stripe: int) -> int:
        """Which of `member`'s k pieces sits in `stripe` (member must be a data member of it)."""
        return (stripe - member - 1) % self.group_size

    def stripes_of(self, member: int) -> list[int]:
        """The k stripes holding `member`'s pieces, in piece order."""
        return [(member + 1 + i) % self.group_size for i in range(self.k)]

    def piece_len(self, nbytes: int) -> int:
        """Length of one piece of a blob of `nbytes` (the group's largest), a multiple of 8."""
        n = -(-max(nbytes, 1) // self.k)
        return n + (-n % 8)


def make_code(parity: str, group_size: int) -> Code:
    """fault.parity ("xor" | "rs2" | "none") over groups of `group_size` members."""
    m = {"none": 0, "xor": 1, "rs2": 2}[parity]
    if parity == "rs2":
        _zfec()  # a missing library is a clear error now, not in the middle of a snapshot
    if group_size <= m:
        raise ValueError(f"fault.parity = {parity!r} needs fault.group_size > {m}, got {group_size}")
    return Code(parity, group_size, m)


def pieces(blob: np.ndarray, plen: int, k: int) -> list[np.ndarray]:
    """The k pieces of `blob`, each `plen` bytes: views of it, zero-padded copies where it ends early."""
    out = []
    for i in range(k):
        piece = blob[i * plen:(i + 1) * plen]
        if len(piece) < plen:
            piece = np.concatenate([piece, np.zeros(plen - len(piece), dtype=np.uint8)])
        out.append(piece)
    return out


def encode_group(blobs: list[np.ndarray], code: Code) -> list[list[np.ndarray]]:
    """Parity of a whole group in one process: out[j] = the m blocks member j stores (block t: stripe j - t)."""
    G, k = code.group_size, code.k
    plen = code.piece_len(max(len(b) for b in blobs))
    split = [pieces(b, plen, k) for b in blobs]
    out: list[list[np.ndarray]] = [[None] * code.m for _ in range(G)]
    for j in range(G):
        parity = code.encode([split[h][code.piece_of(h, j)] for h in code.data_members(j)])
        for t, holder in enumerate(code.holders(j)):
            out[holder][t] = parity[t]
    return out


def rebuild_group(blobs: list[np.ndarray | None], parity: list[list[np.ndarray] | None], nbytes: list[int],
                  code: Code) -> list[np.ndarray]:
    """Every member's blob from what is left (None: member lost, blob or parity). Raises TooManyLosses."""
    G, k = code.group_size, code.k
    lost = [h for h in range(G) if blobs[h] is None or parity[h] is None]
    if len(lost) > code.m:
        raise TooManyLosses(f"{len(lost)} members of a parity group lost ({lost}), "
                            f"fault.parity = {code.name!r} survives {code.m}")
    if not any(blobs[h] is None for h in range(G)):
        return list(blobs)
    plen = code.piece_len(max(nbytes))
    split = [pieces(b, plen, k) if b is not None else None for b in blobs]
    out = list(blobs)
    for h in range(G):
        if blobs[h] is not None:
            continue
        got = []
        for j in code.stripes_of(h):
            members = code.data_members(j)
            blocks = {i: split[x][code.piece_of(x, j)] for i, x in enumerate(members) if split[x] is not None}
            blocks.update({k + t: parity[x][t] for t, x in enumerate(code.holders(j)) if parity[x] is not None})
            got.append(code.decode(blocks)[members.index(h)])
        out[h] = np.concatenate(got)[: nbytes[h]]
    return out
