"""End to end: `torchrun --nproc-per-node 3 -m dist.launch serve` as a subprocess on a free port, called over
HTTP (httpx and the official openai client), checked against a single-process greedy reference."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dist.models import ByteTokenizer, build_model
from tests.multirank import free_port
from tests.test_disagg import reference_greedy

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["hello world", "a", "the quick brown fox", "x" * 30, "serve me"]


class Server:
    """A torchrun job serving on 127.0.0.1:port; stopped (SIGTERM, then SIGKILL of its process group) on close."""

    def __init__(self, nproc=3, *overrides, max_restarts=0):
        for attempt in range(3):  # free_port's port may be taken by another socket before the job binds it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "-m", "dist.launch", "serve",
                   "--set", f"serve.port={self.port}", "--set", "serve.request_timeout_s=120",
                   "--set", "runtime.timeout_s=60", *[a for o in overrides for a in ("--set", o)]]
            self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"serve-{self.port}.log"), "w+")
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                                         start_new_session=True)
            try:
                return self.wait_healthy()
            except RuntimeError:
                if attempt == 2 or "cannot listen on" not in self.output():
                    raise
                self.close()

    def wait_healthy(self, timeout_s=120):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not healthy within {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-20000:]

    def close(self, timeout_s=60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the job is left (its own session)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def disagg():
    server = Server(3)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference():
    model, tok = build_model("tiny", seed=0), ByteTokenizer()
    return {p: tok.decode(reference_greedy(model, tok.encode(p), 12)) for p in PROMPTS}


def complete(url, prompt, **kw):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(url, path, body):
    """Concatenated text of an SSE stream; asserts it ends with data: [DONE]."""
    pieces, done = [], False
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    assert done
    return "".join(pieces)


def test_greedy_disaggregated_equals_reference(disagg, reference):
    for p in PROMPTS:
        out = complete(disagg.url, p)
        assert out["choices"][0]["text"] == reference[p], p
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 12


def test_streaming_equals_non_streaming(disagg):
    body = {"model": "tiny", "prompt": "stream this", "max_tokens": 20, "temperature": 0.8, "seed": 11}
    plain = complete(disagg.url, **{k: v for k, v in body.items() if k != "model"})["choices"][0]["text"]
    assert stream_text(disagg.url, "/v1/completions", body) == plain
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    r = httpx.post(disagg.url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert stream_text(disagg.url, "/v1/chat/completions", chat) == r["choices"][0]["message"]["content"]


def test_fifty_concurrent_requests(disagg, reference):
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [{"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 12, "temperature": 0}
                      for i in range(50)]
            return await asyncio.gather(*(client.post(disagg.url + "/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 50, [r.text[:200] for r in responses if r.status_code != 200]
    for i, r in enumerate(responses):
        assert r.json()["choices"][0]["text"] == reference[PROMPTS[i % len(PROMPTS)]]
    metrics = httpx.get(disagg.url + "/metrics").text
    moved = [line for line in metrics.splitlines() if line.startswith("dist_serve_kv_bytes_moved_total")]
    assert float(moved[0].split()[1]) > 0  # disaggregated: every request's KV went to the decode worker


def test_openai_client(disagg, reference):
    import openai

    client = openai.OpenAI(base_url=disagg.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0)
    assert out.choices[0].text == reference["hello world"]
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    assert streamed == plain.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


HOSTILE = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": "tiny", "prompt": "x" * 9000}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": 42}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 10 ** 9}).encode(), 400, "n"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": [1]}).encode(), 400, "stop"),
]


def test_hostile_inputs_get_openai_errors_and_the_server_keeps_serving(disagg, reference):
    for raw, status, param in HOSTILE:
        r = httpx.post(disagg.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw[:60], r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    r = httpx.post(disagg.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
    assert httpx.get(disagg.url + "/health").status_code == 200
    assert complete(disagg.url, "a")["choices"][0]["text"] == reference["a"]


def test_colocated_equals_reference_then_deadline_then_sigterm_drains(reference):
    server = Server(3, "serve.mode=colocated", "serve.chunk_tokens=8", "serve.request_timeout_s=5")
    try:
        for p in PROMPTS:
            assert complete(server.url, p)["choices"][0]["text"] == reference[p], p
        metrics = httpx.get(server.url + "/metrics").text
        assert "dist_serve_kv_bytes_moved_total 0.0" in metrics  # colocated: KV never moves

        endless = {"model": "tiny", "prompt": "x", "max_tokens": 8000, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/completions", json=endless, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", server.url + "/v1/completions", json={**endless, "stream": True}, timeout=60) as r:
            last = [line for line in r.iter_lines() if line][-1]
        assert json.loads(last[6:])["error"]["code"] == "timeout"
        assert httpx.get(server.url + "/health").status_code == 200

        body = {"model": "tiny", "prompt": "drain", "max_tokens": 30, "temperature": 0, "ignore_eos": True,
                "stream": True}
        lines = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not lines:
                    os.kill(server.proc.pid, signal.SIGTERM)  # torchrun passes it on to every rank
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        server.proc.wait(60)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")
        assert "ERROR dist" not in server.output()  # no rank logged an error while stopping
    finally:
        server.close()


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of a torchrun worker by its RANK (a child of the torchrun process)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in env:
            return int(entry)
    raise RuntimeError(f"no rank {rank} under pid {torchrun_pid}")


def test_killed_decode_worker_ends_the_stream_and_the_job_comes_back(reference):
    server = Server(2, max_restarts=1)  # rank 0 routes and prefills, rank 1 decodes
    try:
        body = {"model": "tiny", "prompt": "die", "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        lines = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            try:
                for line in r.iter_lines():
                    if line.startswith("data: ") and not lines:
                        os.kill(rank_pid(server.proc.pid, 1), signal.SIGKILL)
                    if line:
                        lines.append(line)
            except httpx.RemoteProtocolError:  # the router went down before the error event left
                lines.append("closed")
        assert lines[-1] == "closed" or "error" in json.loads(lines[-1][6:]), lines[-3:]
        assert "data: [DONE]" not in lines
        server.wait_healthy(timeout_s=120)  # the restarted job, same port
        assert complete(server.url, "a")["choices"][0]["text"] == reference["a"]
    finally:
        server.close()


@pytest.mark.parametrize("overrides,needle", [
    (["serve.prefill_ranks=[5]", "serve.decode_ranks=[0]"], "serve.prefill_ranks"),
    (["model.path={empty}"], "config.json"),
    (["serve.port={taken}"], "cannot listen on 127.0.0.1"),
])
def test_bad_serve_config_is_one_line_and_exit_2(tmp_path, overrides, needle):
    taken = socket.create_server(("127.0.0.1", 0))  # a port someone else listens on
    args = [a for o in overrides for a in ("--set", o.format(empty=tmp_path, taken=taken.getsockname()[1]))]
    with taken:
        r = subprocess.run([sys.executable, "-m", "dist.launch", "serve", "--set", f"serve.port={free_port()}",
                            *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("dist: error")]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_long_prompt_over_a_prefill_group_of_two():
    """4 ranks: router 0, prefill group [1, 2] (ring attention), decode 3; greedy equals the reference."""
    prompt = "a long prompt, " * 20
    model, tok = build_model("tiny", seed=0), ByteTokenizer()
    want = tok.decode(reference_greedy(model, tok.encode(prompt), 12))
    server = Server(4, "serve.prefill_ranks=[1,2]", "serve.decode_ranks=[3]", "serve.prefill_group=2")
    try:
        assert complete(server.url, prompt)["choices"][0]["text"] == want
        assert complete(server.url, "short")["choices"][0]["finish_reason"] == "length"
    finally:
        assert server.close() is not None


def test_streams_are_not_held_by_nagle():
    """The router's listening socket hands out connections with TCP_NODELAY under asyncio (as uvicorn serves
    them): otherwise each stream's first small chunks wait for the client's delayed ACK (up to 40 ms)."""
    from dist.serve import listen

    async def main():
        seen = asyncio.get_running_loop().create_future()

        def accepted(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listen("127.0.0.1", 0)
        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            nodelay = await asyncio.wait_for(seen, 30)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0
