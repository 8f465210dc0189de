"""The serving entry behind `python -m dist.launch serve`: prefill/decode disaggregation behind an
OpenAI-compatible HTTP API.

    torchrun --nproc-per-node 3 -m dist.launch serve        # router 0, prefill 1, decode 2
    python -m dist.launch serve                             # one process: router + one worker

Every rank loads the model, then plays its role (dist.disagg.roles): rank 0 runs the router and the
HTTP server (and a worker loop in a thread when it also prefills or decodes); the other ranks run a
worker loop. Links are built once, in the same order on every rank: router <-> each worker, and
prefill -> decode for every pair, whose KV layouts are checked before anything is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from dist.config import ConfigError
from dist.disagg.channel import DistChannel, LocalChannel
from dist.disagg.kvcache import KVLayout, PagedKVCache
from dist.disagg.roles import Roles
from dist.disagg.runner import Runner
from dist.disagg.transfer import KVReceiver, KVSender, handshake_recv, handshake_send
from dist.disagg.worker import Worker
from dist.runtime import Runtime

log = logging.getLogger("dist.serve")


def load_model(cfg, device):
    """(model, tokenizer, name): model.path (a Hugging Face Llama folder or a `train` checkpoint) or the
    model.preset with fixed random weights (serve.seed). The tokenizer is the folder's tokenizer.json
    (with its chat_template when tokenizer_config.json has one), else bytes."""
    from dist.models import build_model, load_hf, load_tokenizer

    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.path:
        model = load_hf(cfg.model.path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(cfg.model.path)
        conf = Path(cfg.model.path) / "tokenizer_config.json"
        if conf.is_file():
            try:
                tokenizer.chat_template = json.loads(conf.read_text()).get("chat_template")
            except json.JSONDecodeError as e:
                raise ValueError(f"{conf} is not valid JSON: {e}") from None
        name = Path(cfg.model.path).resolve().name
    else:
        model = build_model(cfg.model.preset, seed=cfg.serve.seed, dtype=dtype).to(device)
        tokenizer, name = load_tokenizer(None), cfg.model.preset
    model.eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"model.path: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}")
    return model, tokenizer, cfg.serve.model_name or name


def build_links(rt: Runtime, roles: Roles):
    """Process groups for every link, created in the same order on every rank (control on gloo, KV and
    prefill groups on the job's backend: NCCL on GPUs); returns this rank's
    (control channel to the router or {worker: channel} on the router, {decode: kv channel},
    {prefill: kv channel}, (group, ranks) of its prefill group or None)."""
    me = rt.rank
    ctrl, to_decode, from_prefill = {}, {}, {}

    def two(ranks, backend=None):  # a group per direction, as DistChannel wants
        return (dist.new_group(ranks, backend=backend, timeout=rt.timeout) for _ in range(2))

    for w in roles.workers:  # control messages are small and host-side: gloo on every machine
        if w == roles.router:
            continue
        down, up = two([roles.router, w], backend="gloo")
        if me == roles.router:
            ctrl[w] = DistChannel(w, down, up, "cpu")
        elif me == w:
            ctrl[roles.router] = DistChannel(roles.router, up, down, "cpu")
    ring = None  # (group, ranks) of this rank's prefill group
    for ranks in roles.ring_groups:
        if len(ranks) > 1:
            group = dist.new_group(list(ranks), timeout=rt.timeout)
            if me in ranks:
                ring = (group, ranks)
    if roles.mode == "disaggregated":
        for p in roles.prefill_leaders:
            for d in roles.decode:
                if p == d:
                    continue
                fwd, back = two([p, d])
                if me == p:
                    to_decode[d] = DistChannel(d, fwd, back, rt.device)
                elif me == d:
                    from_prefill[p] = DistChannel(p, back, fwd, rt.device)
    return ctrl, to_decode, from_prefill, ring


def core_plan(roles: Roles, available: list[int], node_ranks: range) -> dict[int, list[int]]:
    """serve.pin_cores: the CPU cores of every rank on this node. Each worker gets its own share, decode
    workers first (their step waits on the CPU every token), then the prefill ranks; the router and any
    other rank take the cores left over, or share the last worker's. Fewer cores than workers: shares wrap."""
    workers = list(dict.fromkeys(r for r in (*roles.decode, *roles.prefill) if r in node_ranks))
    per = max(1, len(available) // max(1, len(workers)))
    plan = {}
    for i, r in enumerate(workers):
        start = (i * per) % len(available)
        plan[r] = available[start:start + per]
    spare = (available[len(workers) * per:] or plan[workers[-1]]) if workers else available
    return {r: plan.get(r, spare) for r in node_ranks}


def pin_cores(roles: Roles) -> list[int]:
    """Restrict this process (every thread it has so far, and so every later one) to its cores."""
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    first = rank - local
    node = range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    cores = core_plan(roles, sorted(os.sched_getaffinity(0)), node)[rank]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass  # a thread that just ended
    return cores


def make_worker(rank, roles, model, tokenizer, layout, cfg, ctrl, to_decode, from_prefill, ring, rt) -> Worker:
    """A worker with its cache, KV senders and receivers; raises ValueError on a KV layout mismatch.
    KV carries the workers' generation (rt.generation, agreed by every rank), so a restarted job
    never uses a previous generation's KV."""
    prefills, decodes = roles.phases(rank)
    cache = PagedKVCache(layout, cfg.serve.num_blocks, rt.device)
    generation = rt.generation
    for ch in to_decode.values():
        handshake_send(ch, layout)
    for ch in from_prefill.values():
        handshake_recv(ch, layout)
    senders = {d: KVSender(ch, cache, generation) for d, ch in to_decode.items()}
    runner = Runner(model, cache, *(ring or ()))
    worker = Worker(rank, prefills=prefills, decodes=decodes, runner=runner, tokenizer=tokenizer,
                    ctrl=ctrl, senders=senders, max_batch=cfg.serve.max_batch, chunk_tokens=cfg.serve.chunk_tokens)
    worker.receivers = [KVReceiver(ch, cache, generation, worker.deliver) for ch in from_prefill.values()]
    return worker


def serve(cfg) -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"serve needs {missing}: pip install 'dist[serve]'")
    world = int(os.environ.get("WORLD_SIZE", 1))
    roles = Roles.from_config(cfg.serve, world)
    # The router's port is bound first, before the model loads and the process group starts its threads:
    # a port in use is then one clear error, and no socket the job opens later can take it.
    sock = listen(cfg.serve.host, cfg.serve.port) if int(os.environ.get("RANK", 0)) == roles.router else None
    # Receiver threads (KV, control, HTTP) wake on I/O while the worker loop computes; with the default 5 ms
    # switch interval each wake-up could wait that long for the interpreter lock.
    sys.setswitchinterval(0.0005)
    cores = pin_cores(roles) if cfg.serve.pin_cores and hasattr(os, "sched_setaffinity") else None
    with Runtime.start(cfg) as rt:
        if cores and not cfg.runtime.threads:
            torch.set_num_threads(len(cores))
        model, tokenizer, name = load_model(cfg, rt.device)
        max_model_len = cfg.serve.max_model_len or model.config.max_seq_len
        if cfg.serve.num_blocks * cfg.serve.block_size < max_model_len:
            raise ConfigError(f"config key 'serve.num_blocks' ({cfg.serve.num_blocks}) x serve.block_size "
                              f"({cfg.serve.block_size}) holds fewer tokens than one request may use "
                              f"({max_model_len}); raise it or lower serve.max_model_len")
        layout = KVLayout.of(model.config, cfg.serve.block_size, getattr(torch, cfg.model.dtype))
        ctrl, to_decode, from_prefill, ring = build_links(rt, roles)
        if rt.rank == roles.router:
            _run_router(cfg, roles, model, tokenizer, name, layout, max_model_len, ctrl, to_decode, from_prefill,
                        rt, sock)
            return
        signal.signal(signal.SIGTERM, lambda *_: log.warning("SIGTERM: draining until the router stops us"))
        if rt.rank in roles.workers:
            make_worker(rt.rank, roles, model, tokenizer, layout, cfg, ctrl[roles.router], to_decode, from_prefill,
                        ring, rt).run()
        else:  # a prefill group's follower: runs its leader's prompts with it
            Runner(model, PagedKVCache(layout, 1, rt.device), *ring).follow()


def listen(host: str, port: int):
    """A socket bound to host:port with SO_REUSEADDR (a restarted job takes its port back at once).
    The protocol is named (IPPROTO_TCP): asyncio sets TCP_NODELAY only on connections whose socket says
    TCP, and without it Nagle's algorithm holds each stream's first small chunks until the client's
    delayed ACK (up to 40 ms) instead of sending every token as it comes."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"config key 'serve.port': cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def _http_server(config):
    """A uvicorn.Server that leaves signals to us: uvicorn re-raises SIGTERM after its shutdown, which would
    end the process before the workers are told to stop."""
    import contextlib

    import uvicorn

    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext
    return server


def _run_router(cfg, roles, model, tokenizer, name, layout, max_model_len, channels, to_decode, from_prefill,
                rt, sock) -> None:
    import uvicorn

    from dist.disagg.api import Metrics, build_app
    from dist.disagg.router import Router

    thread = None
    if roles.router in roles.workers:  # rank 0 also prefills (N = 2) or is a colocated worker
        mine, theirs = LocalChannel.pair(cfg.runtime.timeout_s)
        channels = {**channels, roles.router: mine}
        worker = make_worker(roles.router, roles, model, tokenizer, layout, cfg, theirs, to_decode, from_prefill,
                             None, rt)
        thread = threading.Thread(target=worker.run, name="worker", daemon=True)
        thread.start()
    metrics = Metrics()
    router = Router(roles, channels, cfg.serve, metrics, layout.block_size)
    app = build_app(router, name, tokenizer, cfg.serve, max_model_len, metrics)
    server = _http_server(uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
                                         timeout_graceful_shutdown=int(cfg.serve.request_timeout_s) + 1))

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # drain: stop accepting, finish open requests, stop workers
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
        router.start(loop)
        log.info("serving %s on http://%s:%d (%s: prefill %s, decode %s)", name, cfg.serve.host, cfg.serve.port,
                 roles.mode, list(roles.prefill), list(roles.decode))
        await server.serve(sockets=[sock])  # returns after SIGTERM / SIGINT once open requests drained
        await asyncio.to_thread(router.stop)

    asyncio.run(main())
    if thread is not None:
        thread.join(timeout=10)
