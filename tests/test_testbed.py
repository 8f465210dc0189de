"""The namespace testbed: shaped bandwidth, a torchrun job across hosts, clean teardown.

Needs root and iproute2 (`ip`, `tc` with tbf); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from dist.sim import load_link_profiles

from benchmarks import bench_links
from benchmarks.testbed import Testbed, TestbedError, check_prerequisites, list_namespaces, parse_rate, teardown
from benchmarks.testbed import testbed as testbed_mod

PREFIX = "dtbtest-"  # not the CLI's default, so a testbed someone built by hand survives the tests


def _skip_reason() -> str | None:
    try:
        check_prerequisites()
    except TestbedError as e:
        return str(e)
    probe = f"{PREFIX}probe"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


SKIP = _skip_reason()
needs_netns = pytest.mark.skipif(SKIP is not None, reason=f"testbed unavailable: {SKIP}")


def _tc_sent_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return int(re.search(r"Sent (\d+) bytes", out).group(1))


_ALL_REDUCE = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.full((1 << 18,), float(dist.get_rank() + 1))   # 1 MiB, so the link sees it
    dist.all_reduce(t)
    # TokenRing over 2 hosts x 2 ranks: the cross-host pairs over the shaped link
    from dist.kernels import attention
    from dist.ringattn import ring_attention, shard
    r, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = ring_attention(*(shard(x, 1, r, world) for x in (q, k, v)), strategy="tokenring")
    err = (out - shard(attention(q, k, v, causal=True), 1, r, world)).abs().max().item()
    # one write per line: the two ranks of a host share one unbuffered output
    os.write(1, (f"RESULT rank={r} world={world} "
                 f"local={os.environ['LOCAL_RANK']} ifname={os.environ['GLOO_SOCKET_IFNAME']} "
                 f"min={t.min().item()} max={t.max().item()} err={err:.1e}\\n").encode())
    dist.barrier()  # nobody closes its connections while a peer still reads from them
    dist.destroy_process_group()
""")


def test_parse_and_validation():
    assert parse_rate("200mbit") == 200e6
    assert parse_rate("1gbit") == 1e9
    assert parse_rate("10mbps") == 80e6
    assert parse_rate(5e8) == 5e8
    with pytest.raises(ValueError, match="rate"):
        parse_rate("fast")
    with pytest.raises(ValueError, match="hosts"):
        Testbed(hosts=0)
    with pytest.raises(ValueError, match="topology"):
        Testbed(hosts=2, topology="ring")
    with pytest.raises(ValueError, match="rate"):
        Testbed(hosts=3, rate=["1gbit", "2gbit"])
    with pytest.raises(ValueError, match="subnet"):
        Testbed(hosts=2, subnet="8.8")
    # default burst: 1 ms at the rate, never below 32 KiB
    tb = Testbed(hosts=2, rate="1gbit")
    assert tb._burst_bytes(1e9) == 1e9 / 8 / 1000
    assert tb._burst_bytes(1e6) == 32 * 1024
    # default send buffer cap: 40 ms of the link, within [64 KiB, 4 MiB]
    assert tb._sndbuf_bytes(200e6) == 1_000_000
    assert tb._sndbuf_bytes(1e6) == 64 << 10 and tb._sndbuf_bytes(10e9) == 4 << 20
    assert Testbed(hosts=2, sndbuf=None)._sndbuf_bytes(200e6) is None
    assert Testbed(hosts=2, sndbuf="256kb")._sndbuf_bytes(200e6) == 256 * 1024
    with pytest.raises(ValueError, match="sndbuf"):
        Testbed(hosts=2, sndbuf="lots")


def test_not_root_message(monkeypatch):
    monkeypatch.setattr(testbed_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedError, match="needs root"):
        check_prerequisites()
    monkeypatch.setattr(testbed_mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(testbed_mod.shutil, "which", lambda tool: None if tool == "tc" else "/x/" + tool)
    with pytest.raises(TestbedError, match="tc"):
        check_prerequisites()


@needs_netns
@pytest.mark.timeout(90)
def test_two_hosts_shaped_link_and_torchrun(tmp_path):
    teardown(PREFIX)
    rate = 200e6
    with Testbed(hosts=2, rate="200mbit", prefix=PREFIX) as tb:
        assert list_namespaces(PREFIX) == [f"{PREFIX}br", f"{PREFIX}h0", f"{PREFIX}h1"]
        for h in range(2):  # the send buffer cap is set inside the hosts only
            wmem = subprocess.run(tb.exec_argv(h, ["sysctl", "-n", "net.ipv4.tcp_wmem"]), capture_output=True,
                                  text=True, check=True).stdout.split()
            assert int(wmem[2]) == tb._sndbuf_bytes(rate), wmem
        # Plain TCP, each direction. The shaper counts Ethernet frames, so the TCP payload
        # rate is ~96% of the setting; 20% is the accepted band.
        for src, dst in ((0, 1), (1, 0)):
            bps = tb.tcp_throughput(src, dst, seconds=1.0, port=5301)
            assert 0.8 * rate <= bps <= 1.2 * rate, (src, dst, bps)
        # gloo all_reduce over 2 hosts x 2 ranks through torchrun.
        script = tmp_path / "all_reduce.py"
        script.write_text(_ALL_REDUCE)
        sent_before = [_tc_sent_bytes(tb.ns(h), "eth0") for h in range(2)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        results = tb.run([str(script)], nproc_per_node=2, timeout_s=60, master_port=29611,
                         env={"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
        for r in results:
            assert r.returncode == 0 and not r.timed_out, "\n=====\n".join(x.output[-3000:] for x in results)
        lines = [m for r in results for m in re.findall(r"RESULT [^\n]*?err=\S+?e[-+]\d+", r.output)]
        ranks = sorted(int(re.search(r"rank=(\d+)", ln).group(1)) for ln in lines)
        assert ranks == [0, 1, 2, 3], "\n=====\n".join(x.output[-3000:] for x in results)
        for ln in lines:
            assert "world=4" in ln and "ifname=eth0" in ln
            assert "min=10.0" in ln and "max=10.0" in ln  # 1 + 2 + 3 + 4
            assert float(re.search(r"err=(\S+)", ln).group(1)) < 1e-6, ln  # lse is float32 by contract
        # rank r runs on host r // 2 (node rank i holds ranks 2i, 2i+1)
        for r in results:
            host_ranks = sorted(int(x) for x in re.findall(r"RESULT rank=(\d+)", r.output))
            assert host_ranks == [2 * r.host, 2 * r.host + 1]
        # the all-reduce's 1 MiB tensors crossed each host's shaped NIC
        sent_after = [_tc_sent_bytes(tb.ns(h), "eth0") for h in range(2)]
        assert all(a - b > (1 << 20) // 2 for a, b in zip(sent_after, sent_before)), (sent_before, sent_after)
        # the link probe across the same testbed writes profiles dist.sim reads, near the setting
        links = tmp_path / "links.json"
        bench_links.probe_testbed(tb, ["--bytes", str(2 << 20), "--repeats", "3", "--json", str(links)],
                                  timeout_s=60, master_port=29612)
        prof = load_link_profiles(str(links))["testbed-switch-200mbit-p2"]
        assert 0.8 * rate / 8 <= prof.bandwidth_Bps <= 1.2 * rate / 8, prof
        # full duplex with one gloo group per direction (a half-duplex link would give 0.5;
        # CPU contention on a busy 2-core machine costs some)
        assert prof.duplex >= 0.65, prof
        assert 0 < prof.latency_s < 0.01, prof
        doc = json.loads(links.read_text())
        patterns = {r["pattern"] for r in doc["measurements"]}
        assert patterns == {"send", "shift", "exchange", "alltoall", "allgather", "shift_1g"}
        # a stray process left inside (as after a crash) must not stop teardown
        subprocess.Popen(tb.exec_argv(0, [sys.executable, "-c", "import time; time.sleep(300)"]),
                         start_new_session=True)
    assert list_namespaces(PREFIX) == []
    assert not os.path.exists(testbed_mod._state_path(PREFIX))
    assert teardown(PREFIX) == []  # idempotent


@needs_netns
@pytest.mark.timeout(60)
def test_mesh_routes_each_pair_over_its_own_link():
    teardown(PREFIX)
    rate = 200e6
    with Testbed(hosts=3, rate="200mbit", topology="mesh", prefix=PREFIX) as tb:
        before = {dev: _tc_sent_bytes(tb.ns(0), dev) for dev in ("to1", "to2")}
        bps = tb.tcp_throughput(0, 2, seconds=1.0, port=5302)
        assert 0.8 * rate <= bps <= 1.2 * rate, bps
        sent = {dev: _tc_sent_bytes(tb.ns(0), dev) - before[dev] for dev in ("to1", "to2")}
        assert sent["to2"] > 0.8 * rate / 8 * 0.9 and sent["to1"] < 100_000, sent
    assert list_namespaces(PREFIX) == []


@pytest.mark.timeout(120)
def test_link_probe_on_loopback(tmp_path):
    """bench_links without a testbed (no root needed): torchrun on loopback, 2 ranks."""
    out = tmp_path / "links.json"
    cmd = [sys.executable, bench_links.__file__, "--world-size", "2", "--bytes", str(1 << 16), "--repeats", "2",
           "--json", str(out), "--timeout", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prof = load_link_profiles(str(out))["loopback-p2"]
    assert prof.bandwidth_Bps > 0 and prof.latency_s > 0 and 0 < prof.duplex <= 1 and prof.alltoall_Bps > 0
    assert prof.allgather_Bps > 0
    doc = json.loads(out.read_text())
    assert doc["profiles"][0]["group_size"] == 2
    assert {r["pattern"] for r in doc["measurements"]} == {"send", "shift", "exchange", "alltoall", "allgather",
                                                           "shift_1g"}
    a2a = next(r for r in doc["measurements"] if r["pattern"] == "alltoall" and r["size"] == "large")
    assert a2a["bytes"] == 1 << 16  # one call of --bytes (a multiple of 4 x P)
    assert out.with_suffix(".md").exists()


def test_probe_profiles_from_measurements():
    """The probe's reduction to dist.sim profiles, on made-up measurements with known answers."""
    n, lat = 4 << 20, 1e-3

    def rec(pattern, seconds, size="large", nbytes=n):
        return {"group_size": 2, "pattern": pattern, "size": size, "bytes": nbytes, "median_s": seconds,
                "min_s": seconds, "max_s": seconds, "runs": 4}

    records = [rec("shift", lat, "small", 64), rec("send", lat + n / 100e6), rec("shift", lat + n / 80e6),
               rec("alltoall", lat + n / 2 / 50e6), rec("allgather", lat + n / 40e6), rec("exchange", 0.1),
               rec("shift_1g", 0.2)]
    (prof,) = bench_links.profiles_from_records(records, "made-up", "test")
    assert prof["bandwidth_Bps"] == pytest.approx(100e6)
    assert prof["latency_s"] == pytest.approx(lat)
    assert prof["duplex"] == pytest.approx(0.8)
    assert prof["alltoall_Bps"] == pytest.approx(50e6)
    assert prof["allgather_Bps"] == pytest.approx(40e6)  # p - 1 = 1 share of n reaches each rank
    assert prof["per_peer"] is False
    (mesh,) = bench_links.profiles_from_records(records, "made-up", "test", per_peer=True)
    assert mesh["per_peer"] is True and mesh["bandwidth_Bps"] == prof["bandwidth_Bps"]
