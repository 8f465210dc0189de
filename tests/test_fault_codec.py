"""Erasure codes: every pattern of up to m lost members rebuilds bit-exactly; more is reported, never guessed."""

import itertools

import numpy as np
import pytest

from dist.fault.codec import TooManyLosses, encode_group, make_code, rebuild_group, xor_into


def blobs_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]


@pytest.mark.parametrize("parity,G,lengths", [
    ("xor", 2, [13, 13]),
    ("xor", 3, [1001, 999, 1003]),          # odd, unequal lengths
    ("xor", 4, [8 * 1024 + 5, 1, 77, 4096]),
    ("rs2", 3, [17, 17, 17]),
    ("rs2", 4, [1001, 1000, 999, 3]),
    ("rs2", 5, [12345, 12344, 7, 0, 555]),   # an empty blob too
])
def test_every_loss_pattern_up_to_m_rebuilds_bit_exact(parity, G, lengths):
    code = make_code(parity, G)
    blobs = blobs_of(lengths)
    parity_blocks = encode_group(blobs, code)
    for n_lost in range(code.m + 1):
        for lost in itertools.combinations(range(G), n_lost):
            have = [None if h in lost else b for h, b in enumerate(blobs)]
            par = [None if h in lost else p for h, p in enumerate(parity_blocks)]
            out = rebuild_group(have, par, lengths, code)
            for h in range(G):
                assert out[h].tobytes() == blobs[h].tobytes(), (lost, h)


@pytest.mark.parametrize("parity,G", [("xor", 3), ("rs2", 4), ("none", 2)])
def test_more_losses_than_the_code_survives_is_reported(parity, G):
    code = make_code(parity, G)
    blobs = blobs_of([100] * G)
    parity_blocks = encode_group(blobs, code)
    for lost in itertools.combinations(range(G), code.m + 1):
        have = [None if h in lost else b for h, b in enumerate(blobs)]
        par = [None if h in lost else p for h, p in enumerate(parity_blocks)]
        with pytest.raises(TooManyLosses, match="survives"):
            rebuild_group(have, par, [100] * G, code)


def test_rotated_placement_puts_one_block_of_each_stripe_on_each_member():
    for parity, G in [("xor", 2), ("xor", 5), ("rs2", 3), ("rs2", 6)]:
        code = make_code(parity, G)
        for j in range(G):
            members = code.data_members(j) + code.holders(j)
            assert sorted(members) == list(range(G))  # every member exactly once per stripe
        for h in range(G):  # a member's k pieces go to k different stripes, in piece order
            assert [code.piece_of(h, j) for j in code.stripes_of(h)] == list(range(code.k))
        parity_load = [sum(h in code.holders(j) for j in range(G)) for h in range(G)]
        assert parity_load == [code.m] * G  # parity spread evenly


def test_xor_matches_bytewise_reference_on_odd_lengths():
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 9, (1 << 20) + 3):
        blocks = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(3)]
        ref = np.array([a ^ b ^ c for a, b, c in zip(*[b.tolist() for b in blocks])], dtype=np.uint8) \
            if n < 100 else blocks[0] ^ blocks[1] ^ blocks[2]
        assert xor_into(np.empty(n, dtype=np.uint8), blocks).tobytes() == ref.tobytes()


def test_group_too_small_for_the_code_is_a_clear_error():
    with pytest.raises(ValueError, match="group_size"):
        make_code("rs2", 2)


@pytest.mark.parametrize("overrides,match", [
    (["fault.parity=raid6"], r"'fault\.parity' must be one of \['xor', 'rs2', 'none'\]"),
    (["fault.parity=rs2", "fault.group_size=2"], r"'fault\.group_size' must be >= 3 with fault\.parity = 'rs2'"),
    (["fault.snapshot_every=-1"], r"'fault\.snapshot_every'"),
    (["fault.kill_phase=later"], r"'fault\.kill_phase' must be one of"),
])
def test_bad_fault_config_is_one_clear_error(overrides, match):
    from dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_hosts_not_divisible_by_the_group_size_is_a_clear_error():
    from dist.fault.snapshot import parity_groups

    code, groups = parity_groups(12, 2, "xor", 3)  # 6 hosts, 2 ranks each: the same local rank on 3 hosts
    assert code.m == 1 and groups[:2] == [[0, 2, 4], [1, 3, 5]] and len(groups) == 4
    with pytest.raises(ValueError, match=r"'fault\.group_size' \(4\) must divide the number of hosts \(6\)"):
        parity_groups(12, 2, "xor", 4)
    assert parity_groups(4, 4, "xor", 2)[0].m == 0  # one host: no parity
