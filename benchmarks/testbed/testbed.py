"""A multi-host testbed on one machine: network namespaces joined by shaped links.

Each "host" is a network namespace; its ranks talk to each other over the
namespace's loopback (fast, unshaped) and to other hosts over a link shaped
with `tc tbf` in each direction, so communication-bound behaviour can be
measured on a single machine.

Two topologies:

  switch (default)  every host has one NIC `eth0` (a veth) plugged into a
                    bridge that lives in its own namespace `<prefix>br`.
                    tbf on both veth ends shapes the NIC's egress and ingress,
                    like a host with one NIC on a non-blocking switch.
  mesh              one shaped point-to-point link between every pair of
                    hosts (like NVLink or direct-attach cables): host i reaches
                    host j only over link (i, j). Each host's address sits on
                    a stub interface `id0` with a /32 route per peer.

Addresses: host i is 10.77.0.(i+1) (the `subnet` argument changes 10.77).
Everything lives in namespaces named `<prefix>...` (default prefix "dtb-");
nothing outside them is touched, and `down` removes every namespace with the
prefix (after killing the processes still inside), so teardown also works
after a crash.

Python:

    from benchmarks.testbed import Testbed
    with Testbed(hosts=2, rate="1gbit") as tb:
        results = tb.run(["train.py", "--steps", "3"], nproc_per_node=2, timeout_s=120)

CLI (as root):

    python -m benchmarks.testbed up --hosts 4 --rate 1gbit [--topology mesh]
    python -m benchmarks.testbed status
    python -m benchmarks.testbed run --nproc-per-node 1 --timeout 120 -- script.py args
    python -m benchmarks.testbed tcp --src 0 --dst 1 --seconds 2
    python -m benchmarks.testbed down
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

DEFAULT_PREFIX = "dtb-"
_RATE_UNITS = {
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9,
}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}


class TestbedError(RuntimeError):
    """The testbed cannot be built here (not root, no ip/tc) or a command failed."""

    __test__ = False  # not a pytest class


def parse_rate(rate: str | float | int) -> float:
    """A tc rate ("200mbit", "1gbit", "10mbps") or a number of bit/s -> bit/s."""
    if isinstance(rate, (int, float)):
        value = float(rate)
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(rate))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _RATE_UNITS:
            raise ValueError(f"rate: cannot parse {rate!r}; use e.g. '200mbit', '1gbit' or bit/s as a number")
        value = float(m.group(1)) * _RATE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"rate: must be positive, got {rate!r}")
    return value


def _parse_with_units(text: str | int | float, units: dict, what: str) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in units:
        raise ValueError(f"{what}: cannot parse {text!r}")
    return float(m.group(1)) * units[m.group(2).lower()]


def check_prerequisites() -> None:
    """Raise TestbedError with one clear line if namespaces cannot be built here."""
    if sys.platform != "linux":
        raise TestbedError("testbed needs Linux network namespaces (this is %s)" % sys.platform)
    if os.geteuid() != 0:
        raise TestbedError("testbed needs root to create network namespaces (run as root)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise TestbedError(f"testbed needs iproute2's {' and '.join(missing)} on PATH")


def _sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of the existing network namespaces that start with `prefix`."""
    out = _sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(ns: str) -> list[int]:
    """Process ids running inside namespace `ns`."""
    out = _sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace_processes(namespaces: list[str], grace_s: float = 3.0) -> None:
    """SIGTERM every process inside `namespaces`, then SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        pids = [p for ns in namespaces for p in namespace_pids(ns)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(namespace_pids(ns) for ns in namespaces):
            time.sleep(0.1)


def _state_path(prefix: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"{prefix}testbed.json")


def teardown(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every namespace named `<prefix>*` (killing processes inside first). Idempotent.

    Deleting a namespace destroys its veth ends (and with them their peers), its
    bridge and its qdiscs, so nothing of the testbed survives. Returns the
    namespaces removed.
    """
    check_prerequisites()
    namespaces = list_namespaces(prefix)
    kill_namespace_processes(namespaces)
    for ns in namespaces:
        _sh("ip", "netns", "del", ns, check=False)
    left = list_namespaces(prefix)
    if left:
        raise TestbedError(f"could not remove namespaces {left}")
    try:
        os.remove(_state_path(prefix))
    except FileNotFoundError:
        pass
    return namespaces


@dataclasses.dataclass
class HostResult:
    """What one host's torchrun agent did: exit code (None if killed at timeout) and its output."""

    host: int
    returncode: int | None
    output: str
    timed_out: bool


@dataclasses.dataclass
class Testbed:
    """H hosts x G ranks per host on shaped links; `with Testbed(...) as tb:` builds and tears down.

    hosts: number of namespaces ("hosts").
    rate: link rate per direction, a tc rate string ("1gbit") or bit/s; for the
        switch topology also a list with one rate per host (heterogeneous NICs).
    burst: tbf bucket size ("64kb", bytes as int); None = 1 ms at `rate`, at
        least 32 KiB (tbf needs burst >= rate / HZ).
    latency: tbf queue bound ("50ms"): packets that would wait longer are dropped.
        tbf cannot add propagation delay (netem would; it is absent here).
    topology: "switch" (one NIC per host on a bridge) or "mesh" (a link per pair).
    sndbuf: cap on a TCP socket's send buffer inside each host (net.ipv4.tcp_wmem's max in its
        namespace). "auto": 40 ms of the host's link rate, 64 KiB to 4 MiB. A cluster NIC queues
        milliseconds of data; the kernel's default 4 MiB is 0.7 s at 50 Mbit/s, and a send that
        "completes" into it is still on the wire while the next ring step's messages queue behind
        it (measured: TokenRing at P=3, 50 Mbit/s, 11% slower than with the cap; the KV ring the
        same). None: the kernel's default; or a size ("256kb", bytes).
    prefix: namespace name prefix; `down` removes everything with it.
    subnet: first two octets of the private range used inside the namespaces.
    """

    __test__ = False  # not a pytest class

    hosts: int = 2
    rate: str | float | list = "1gbit"
    burst: str | int | None = None
    latency: str = "50ms"
    topology: str = "switch"
    sndbuf: str | int | None = "auto"
    prefix: str = DEFAULT_PREFIX
    subnet: str = "10.77"
    mtu: int = 1500

    def __post_init__(self):
        if not isinstance(self.hosts, int) or not 1 <= self.hosts <= 250:
            raise ValueError(f"hosts: must be an integer in 1..250, got {self.hosts!r}")
        if self.topology not in ("switch", "mesh"):
            raise ValueError(f"topology: must be 'switch' or 'mesh', got {self.topology!r}")
        rates = self.rate if isinstance(self.rate, (list, tuple)) else [self.rate] * self.hosts
        if len(rates) != self.hosts:
            raise ValueError(f"rate: a list needs one rate per host ({self.hosts}), got {len(rates)}")
        if self.topology == "mesh" and len(set(map(str, rates))) > 1:
            raise ValueError("rate: the mesh topology takes one rate for every link")
        self.rates_bps = [parse_rate(r) for r in rates]
        self.latency_s = _parse_with_units(self.latency, _TIME_UNITS, "latency")
        if self.burst is not None:
            _parse_with_units(self.burst, _SIZE_UNITS, "burst")
        if self.sndbuf not in (None, "auto"):
            _parse_with_units(self.sndbuf, _SIZE_UNITS, "sndbuf")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", self.prefix):
            raise ValueError(f"prefix: use 1-20 of [A-Za-z0-9_.-], got {self.prefix!r}")
        if not re.fullmatch(r"(10\.\d{1,3})|(192\.168)|(172\.(1[6-9]|2\d|3[01]))", self.subnet):
            raise ValueError(f"subnet: must be a private range like '10.77', got {self.subnet!r}")
        self._up = False

    # ---- names and addresses -------------------------------------------------------------
    def ns(self, host: int) -> str:
        """Namespace name of host `host`."""
        return f"{self.prefix}h{host}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def addr(self, host: int) -> str:
        """The address other hosts (and gloo) reach host `host` at."""
        return f"{self.subnet}.0.{host + 1}"

    @property
    def ifname(self) -> str:
        """The interface that carries each host's address (GLOO_SOCKET_IFNAME)."""
        return "eth0" if self.topology == "switch" else "id0"

    def _burst_bytes(self, rate_bps: float) -> int:
        if self.burst is not None:
            return int(_parse_with_units(self.burst, _SIZE_UNITS, "burst"))
        # tbf needs burst >= rate / HZ; with high-resolution timers 1 ms of traffic at the
        # rate reached full TCP goodput (96% = line rate less headers) from 100 Mbit/s to
        # 5 Gbit/s here. A real NIC has no burst, so keep it small: a message of N bytes
        # after an idle gap passes `burst` bytes at once and the rest at the rate.
        return max(32 * 1024, int(rate_bps / 8 * 0.001))

    def _sndbuf_bytes(self, rate_bps: float) -> int | None:
        if self.sndbuf is None:
            return None
        if self.sndbuf == "auto":
            return min(4 << 20, max(64 << 10, int(rate_bps / 8 * 0.040)))
        return int(_parse_with_units(self.sndbuf, _SIZE_UNITS, "sndbuf"))

    def _shape(self, ns: str, dev: str, rate_bps: float) -> None:
        _sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{int(rate_bps)}bit", "burst", str(self._burst_bytes(rate_bps)),
            "latency", f"{self.latency_s * 1e3:g}ms")

    # ---- build / tear down -------------------------------------------------------------------
    def up(self) -> "Testbed":
        """Build the namespaces, links and shaping. Fails if a testbed with this prefix exists."""
        check_prerequisites()
        if list_namespaces(self.prefix):
            raise TestbedError(f"namespaces with prefix {self.prefix!r} exist already; "
                               f"run `python -m benchmarks.testbed down --prefix {self.prefix}` first")
        try:
            self._build()
        except BaseException:
            teardown(self.prefix)
            raise
        self._up = True
        with open(_state_path(self.prefix), "w") as f:
            json.dump(self.describe(), f, indent=1)
        return self

    def _build(self) -> None:
        for h in range(self.hosts):
            ns = self.ns(h)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            # No IPv6: gloo must find exactly one (IPv4) address on the interface.
            _sh("ip", "netns", "exec", ns, "sh", "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6", check=False)
            cap = self._sndbuf_bytes(self.rates_bps[h])
            if cap is not None:  # per-namespace sysctl: nothing outside the testbed changes
                _sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                    f"net.ipv4.tcp_wmem=4096 {min(16384, cap)} {cap}")
        if self.topology == "switch":
            br = self.bridge_ns
            _sh("ip", "netns", "add", br)
            _sh("ip", "-n", br, "link", "set", "lo", "up")
            _sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", br, "link", "set", "br0", "up")
            for h in range(self.hosts):
                ns, port = self.ns(h), f"p{h}"
                # The veth is created inside the host namespace with its peer in the
                # bridge namespace: the root namespace never sees it.
                _sh("ip", "-n", ns, "link", "add", "eth0", "mtu", str(self.mtu), "type", "veth",
                    "peer", "name", port, "netns", br)
                _sh("ip", "-n", br, "link", "set", port, "mtu", str(self.mtu), "master", "br0", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.addr(h)}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                self._shape(ns, "eth0", self.rates_bps[h])   # host -> switch
                self._shape(br, port, self.rates_bps[h])     # switch -> host
        else:
            for h in range(self.hosts):
                ns = self.ns(h)
                # A veth whose both ends stay in the namespace serves as a dummy
                # interface (the dummy driver may be missing) holding the address.
                _sh("ip", "-n", ns, "link", "add", "id0", "type", "veth", "peer", "name", "id0p")
                _sh("ip", "-n", ns, "link", "set", "id0p", "up")
                _sh("ip", "-n", ns, "link", "set", "id0", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.addr(h)}/32", "dev", "id0")
            for i in range(self.hosts):
                for j in range(i + 1, self.hosts):
                    a, b = self.ns(i), self.ns(j)
                    _sh("ip", "-n", a, "link", "add", f"to{j}", "mtu", str(self.mtu), "type", "veth",
                        "peer", "name", f"to{i}", "netns", b)
                    for ns, dev, src, dst in ((a, f"to{j}", i, j), (b, f"to{i}", j, i)):
                        _sh("ip", "-n", ns, "link", "set", dev, "up")
                        _sh("ip", "-n", ns, "route", "add", f"{self.addr(dst)}/32", "dev", dev,
                            "src", self.addr(src))
                        self._shape(ns, dev, self.rates_bps[src])

    def down(self) -> None:
        """Tear down (idempotent)."""
        teardown(self.prefix)
        self._up = False

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def describe(self) -> dict:
        """A JSON-able description of the topology (what `status` prints)."""
        return {
            "prefix": self.prefix, "hosts": self.hosts, "topology": self.topology,
            "rate": [f"{r / 1e6:g}mbit" for r in self.rates_bps],
            "burst": self.burst, "burst_bytes": [self._burst_bytes(r) for r in self.rates_bps],
            "latency": f"{self.latency_s * 1e3:g}ms", "subnet": self.subnet, "mtu": self.mtu,
            "sndbuf": self.sndbuf, "sndbuf_bytes": [self._sndbuf_bytes(r) for r in self.rates_bps],
            "ifname": self.ifname,
            "namespaces": [self.ns(h) for h in range(self.hosts)],
            "addresses": [self.addr(h) for h in range(self.hosts)],
        }

    @classmethod
    def attach(cls, prefix: str = DEFAULT_PREFIX) -> "Testbed":
        """The testbed built earlier (e.g. by the CLI's `up`) with this prefix."""
        check_prerequisites()
        try:
            with open(_state_path(prefix)) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise TestbedError(f"no testbed with prefix {prefix!r}; run `up` first") from None
        if not list_namespaces(prefix):
            raise TestbedError(f"testbed {prefix!r} has no namespaces left; run `down` then `up`")
        tb = cls(hosts=d["hosts"], rate=d["rate"] if d["topology"] == "switch" else d["rate"][0],
                 burst=d["burst"], latency=d["latency"], topology=d["topology"], sndbuf=d.get("sndbuf", "auto"),
                 prefix=prefix, subnet=d["subnet"], mtu=d["mtu"])
        tb._up = True
        return tb

    # ---- running things inside -------------------------------------------------------------
    def exec_argv(self, host: int, argv: list[str]) -> list[str]:
        """argv that runs `argv` inside host `host`'s namespace."""
        if not 0 <= host < self.hosts:
            raise ValueError(f"host: must be in 0..{self.hosts - 1}, got {host}")
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, argv: list[str], *, nproc_per_node: int = 1, nnodes: int | None = None,
            timeout_s: float = 300, env: dict | None = None, master_port: int = 29500,
            cwd: str | None = None, fail_grace_s: float = 10.0,
            torchrun_args: list[str] = ()) -> list[HostResult]:
        """Run a torchrun job with one agent per host; returns each host's result.

        argv: the training script and its arguments (`["script.py", ...]`), or
            `["-m", "module", ...]`. Host i runs
            `python -m torch.distributed.run --nnodes N --node-rank i --nproc-per-node G
             --master-addr <host 0> --master-port P argv...` inside its namespace, with
            GLOO_SOCKET_IFNAME set to its interface and OMP_NUM_THREADS=1 unless `env` says.
        nnodes: use the first `nnodes` hosts (default all).
        timeout_s: wall-clock bound; at the deadline every process in the hosts' namespaces is
            killed (SIGTERM, then SIGKILL) and those hosts report timed_out. When one host
            fails, the others get `fail_grace_s` to finish before they are killed too.
        """
        if not self._up:
            raise TestbedError("testbed is not up")
        nnodes = self.hosts if nnodes is None else nnodes
        if not 1 <= nnodes <= self.hosts:
            raise ValueError(f"nnodes: must be in 1..{self.hosts}, got {nnodes}")
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node: must be >= 1, got {nproc_per_node}")
        if not argv:
            raise ValueError("argv: give the script (or -m module) to run")
        base_env = dict(os.environ)
        base_env.setdefault("OMP_NUM_THREADS", "1")
        base_env.update(env or {})
        base_env["GLOO_SOCKET_IFNAME"] = self.ifname
        base_env["PYTHONUNBUFFERED"] = "1"
        logdir = tempfile.mkdtemp(prefix=f"{self.prefix}logs-")
        procs, logs = [], []
        for h in range(nnodes):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                   "--node-rank", str(h), "--nproc-per-node", str(nproc_per_node),
                   "--master-addr", self.addr(0), "--master-port", str(master_port),
                   "--max-restarts", "0", *torchrun_args, *argv]
            log = open(os.path.join(logdir, f"host{h}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(self.exec_argv(h, cmd), stdout=log, stderr=subprocess.STDOUT,
                                          env=base_env, cwd=cwd, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        timed_out = [False] * nnodes
        try:
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if any(p.poll() not in (None, 0) for p in procs):
                    deadline = min(deadline, now + fail_grace_s)
                if now >= deadline:
                    timed_out = [p.poll() is None for p in procs]
                    break
                time.sleep(0.1)
        finally:
            # Whatever is still running inside the job's namespaces (agents, workers in
            # their own sessions, strays) is stopped here.
            kill_namespace_processes([self.ns(h) for h in range(nnodes)])
            for p in procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        results = []
        for h, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            results.append(HostResult(h, None if timed_out[h] else p.returncode, log.read(), timed_out[h]))
            log.close()
        shutil.rmtree(logdir, ignore_errors=True)
        return results

    def tcp_throughput(self, src: int, dst: int, seconds: float = 1.0, port: int = 5201,
                       timeout_s: float = 30) -> float:
        """Bit/s of a plain TCP stream from host `src` to host `dst` for about `seconds`.

        Measured at the receiver between the arrival of 10% and of 90% of the bytes.
        """
        if src == dst:
            raise ValueError("src and dst must be different hosts")
        server = subprocess.Popen(
            self.exec_argv(dst, [sys.executable, "-c", _TCP_SERVER, self.addr(dst), str(port)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            client = subprocess.run(
                self.exec_argv(src, [sys.executable, "-c", _TCP_CLIENT, self.addr(dst), str(port),
                                     str(seconds)]), capture_output=True, text=True, timeout=timeout_s)
            if client.returncode != 0:
                raise TestbedError(f"tcp client failed: {client.stderr.strip()}")
            out, err = server.communicate(timeout=timeout_s)
            if server.returncode != 0:
                raise TestbedError(f"tcp server failed: {err.strip()}")
            nbytes, secs = map(float, out.split())
            return nbytes * 8 / secs
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


_TCP_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(20)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(20)
marks, n = [], 0                      # (arrival time, bytes received so far)
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    n += len(b)
    marks.append((time.perf_counter(), n))
# rate between the 10% and 90% marks of the bytes: slow start and a late final read
# (the receiver descheduled on a busy machine) do not count
lo = next(m for m in marks if m[1] >= 0.1 * n)
hi = next(m for m in marks if m[1] >= 0.9 * n)
print(hi[1] - lo[1], hi[0] - lo[0])
"""

_TCP_CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
buf = b"x" * (1 << 16); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build a testbed")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--rate", default="1gbit", help="per direction; comma list = one per host")
    p_up.add_argument("--burst", default=None)
    p_up.add_argument("--latency", default="50ms", help="tbf queue bound")
    p_up.add_argument("--topology", choices=["switch", "mesh"], default="switch")
    p_up.add_argument("--sndbuf", default="auto", help="TCP send buffer cap per host: auto (40 ms of the "
                      "link), default (the kernel's), or a size like 256kb")
    p_up.add_argument("--subnet", default="10.77")
    sub.add_parser("down", help="remove every namespace with the prefix")
    sub.add_parser("status", help="print the testbed and its qdiscs")
    p_run = sub.add_parser("run", help="run a torchrun job across the hosts")
    p_run.add_argument("--nproc-per-node", type=int, default=1)
    p_run.add_argument("--nnodes", type=int, default=None)
    p_run.add_argument("--timeout", type=float, default=300)
    p_run.add_argument("--master-port", type=int, default=29500)
    p_run.add_argument("argv", nargs=argparse.REMAINDER, help="-- script.py args (or -m module args)")
    p_tcp = sub.add_parser("tcp", help="measure a plain TCP stream between two hosts")
    p_tcp.add_argument("--src", type=int, default=0)
    p_tcp.add_argument("--dst", type=int, default=1)
    p_tcp.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "up":
            rate = args.rate.split(",") if "," in args.rate else args.rate
            sndbuf = None if args.sndbuf == "default" else args.sndbuf
            tb = Testbed(hosts=args.hosts, rate=rate, burst=args.burst, latency=args.latency,
                         topology=args.topology, sndbuf=sndbuf, prefix=args.prefix, subnet=args.subnet).up()
            print(json.dumps(tb.describe(), indent=1))
        elif args.cmd == "down":
            removed = teardown(args.prefix)
            print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
        elif args.cmd == "status":
            check_prerequisites()
            names = list_namespaces(args.prefix)
            if not names:
                print(f"no testbed (no namespaces with prefix {args.prefix!r})")
                return 0
            try:
                print(json.dumps(Testbed.attach(args.prefix).describe(), indent=1))
            except TestbedError as e:
                print(f"warning: {e}")
            for ns in names:
                qd = _sh("tc", "-n", ns, "qdisc", "show", check=False).stdout
                tbf = [line for line in qd.splitlines() if "tbf" in line]
                print(f"{ns}: pids={len(namespace_pids(ns))} " + "; ".join(tbf))
        elif args.cmd == "run":
            rest = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            results = Testbed.attach(args.prefix).run(rest, nproc_per_node=args.nproc_per_node,
                                                      nnodes=args.nnodes, timeout_s=args.timeout,
                                                      master_port=args.master_port)
            for r in results:
                status = "TIMEOUT" if r.timed_out else f"rc={r.returncode}"
                print(f"===== host {r.host} ({status}) =====\n{r.output}")
            return 0 if all(r.returncode == 0 for r in results) else 1
        elif args.cmd == "tcp":
            bps = Testbed.attach(args.prefix).tcp_throughput(args.src, args.dst, args.seconds)
            print(f"host {args.src} -> host {args.dst}: {bps / 1e6:.1f} Mbit/s")
    except (TestbedError, ValueError) as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
