"""dist.disagg in one process: roles, pages, the paged model runner, sampling, KV transfer, and whole
worker loops (prefill + decode joined by the in-process link) against a plain full-sequence reference."""

import threading
import time

import pytest
import torch

from dist.config import ConfigError, ServeConfig
from dist.disagg.channel import LocalChannel, Report, Request, Stop
from dist.disagg.kvcache import BlockManager, KVLayout, PagedKVCache
from dist.disagg.roles import Roles
from dist.disagg.runner import Runner
from dist.disagg.sampling import SamplingParams, Sequence, sample, sample_batch
from dist.disagg.transfer import KVPoll, KVReceiver, KVSender, checksum, handshake_recv, handshake_send
from dist.disagg.worker import Worker
from dist.models import ByteTokenizer, build_model


def reference_greedy(model, prompt, max_tokens):
    """Greedy tokens from full forwards over the whole sequence (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------- roles

@pytest.mark.parametrize("world,prefill,decode", [(1, (0,), (0,)), (2, (0,), (1,)), (3, (1,), (2,)),
                                                  (4, (1,), (2, 3)), (5, (1, 2), (3, 4))])
def test_default_roles(world, prefill, decode):
    roles = Roles.from_config(ServeConfig(), world)
    assert (roles.prefill, roles.decode, roles.router) == (prefill, decode, 0)


def test_colocated_workers_do_both_phases():
    roles = Roles.from_config(ServeConfig(mode="colocated"), 3)
    assert roles.workers == (1, 2) and roles.phases(1) == roles.phases(2) == (True, True)
    assert roles.phases(0) == (False, False)


def test_core_plan_gives_each_worker_its_own_cores():
    from dist.serve import core_plan

    def roles(world, mode="disaggregated", **kw):
        return Roles.from_config(ServeConfig(mode=mode, **kw), world)

    # 2 cores, router + prefill + decode: decode alone on a core, the router beside the prefill worker
    assert core_plan(roles(3), [0, 1], range(3)) == {2: [0], 1: [1], 0: [1]}
    assert core_plan(roles(3, "colocated"), [0, 1], range(3)) == {2: [0], 1: [1], 0: [1]}
    # 8 cores, 1 prefill + 2 decode: 2 cores a worker, the router on the 2 left over
    plan = core_plan(roles(4, prefill_ranks=[1], decode_ranks=[2, 3]), list(range(8)), range(4))
    assert plan == {2: [0, 1], 3: [2, 3], 1: [4, 5], 0: [6, 7]}
    # more workers than cores: shares wrap; every rank gets cores that exist
    plan = core_plan(roles(5), [0, 1], range(5))
    assert all(plan[r] and set(plan[r]) <= {0, 1} for r in range(5))


@pytest.mark.parametrize("prefill,decode,key", [([1], [], "serve.decode_ranks"), ([5], [2], "serve.prefill_ranks"),
                                                ([1, 2], [2], "serve.decode_ranks"), ([1], [1], "serve.decode_ranks"),
                                                ([1], [3], "serve.prefill_ranks")])
def test_roles_that_do_not_fit_name_the_key(prefill, decode, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Roles.from_config(ServeConfig(prefill_ranks=prefill, decode_ranks=decode), 4)


@pytest.mark.parametrize("override,key", [("serve.max_batch=0", "serve.max_batch"),
                                          ("serve.decode_ranks=[-1]", "serve.decode_ranks"),
                                          ("serve.request_timeout_s=0", "serve.request_timeout_s")])
def test_serve_config_errors_name_the_key(override, key):
    from dist.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# ---------------------------------------------------------------- pages

def test_block_manager_refcounts_and_back_pressure():
    m = BlockManager(4)
    a = m.allocate(3)
    assert len(set(a)) == 3 and m.num_free == 1
    assert m.allocate(2) is None and m.num_free == 1  # too few: nothing taken
    m.share(a[:1])
    m.free(a)
    assert m.num_free == 3  # a[0] still referenced once
    m.free(a[:1])
    assert m.num_free == 4
    assert sorted(m.allocate(4)) == [0, 1, 2, 3]


def test_runner_matches_full_forward():
    """Chunked prefill and batched decode over scattered pages == the model's full forward (float64)."""
    model = build_model("tiny", seed=0).double()
    cache = PagedKVCache(KVLayout.of(model.config, 4, torch.float64), 64)
    cache.manager.allocate(5)  # pages in use elsewhere: the sequences' pages are not 0, 1, 2...
    runner = Runner(model, cache)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 512, (23,), generator=gen).tolist()
    b = torch.randint(0, 512, (9,), generator=gen).tolist()
    with torch.no_grad():
        ref_a, ref_b = model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]
    pa, pb = cache.manager.allocate(6), cache.manager.allocate(3)
    tol = dict(atol=1e-6, rtol=0)  # the attention kernels keep their log-sum-exp in float32
    torch.testing.assert_close(runner.prefill(a[:10], 0, pa), ref_a[9].float(), **tol)
    torch.testing.assert_close(runner.prefill(a[10:22], 10, pa), ref_a[21].float(), **tol)
    torch.testing.assert_close(runner.prefill(b[:8], 0, pb), ref_b[7].float(), **tol)
    out = runner.decode([a[22], b[8]], [22, 8], [pa, pb])
    torch.testing.assert_close(out, torch.stack([ref_a[22], ref_b[8]]).float(), **tol)


# ---------------------------------------------------------------- sampling

def test_sampling_greedy_seeded_and_top_p():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams(temperature=0), 0) == int(logits.argmax())
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, p, step) for step in range(20)]
    assert draws == [sample(logits, p, step) for step in range(20)]  # same seed, same tokens
    assert len(set(draws)) > 1
    assert all(sample(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=s), 0) == int(logits.argmax())
               for s in range(10))  # top_p that small keeps only the most likely token


def test_a_batch_samples_as_each_row_alone():
    logits = torch.randn(6, 512, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=t, top_p=p, seed=i) for i, (t, p) in
              enumerate([(0, 1), (0.8, 1), (0, 1), (1.5, 0.9), (0, 1), (1.0, 0.5)])]
    steps = [0, 3, 1, 7, 2, 5]
    want = [sample(logits[i], params[i], steps[i]) for i in range(6)]
    assert sample_batch(logits, params, steps) == want
    assert [want[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(dim=-1).tolist()


def test_stop_strings_streamed_pieces_equal_the_final_text():
    tok = ByteTokenizer()
    seq = Sequence(1, [tok.bos_id], SamplingParams(max_tokens=50, stop=["END"]))
    pieces, finish = [], None
    for ch in "abc ENx EN END more".encode():
        delta, finish = seq.append(ch, tok)
        pieces.append(delta)
        if finish:
            break
    assert finish == "stop" and seq.text == "abc ENx EN " and "".join(pieces) == seq.text
    seq = Sequence(2, [tok.bos_id], SamplingParams(max_tokens=3))
    assert [seq.append(t, tok)[1] for t in b"xyz"] == [None, None, "length"]
    seq = Sequence(3, [tok.bos_id], SamplingParams(max_tokens=9))
    assert seq.append(ord("q"), tok) == ("q", None) and seq.append(tok.eos_id, tok) == ("", "stop")
    seq = Sequence(4, [tok.bos_id], SamplingParams(max_tokens=9))  # a split UTF-8 character waits for its rest
    e_acute = "é".encode()
    assert seq.append(e_acute[0], tok) == ("", None) and seq.append(e_acute[1], tok) == ("é", None)
    seq = Sequence(5, [tok.bos_id], SamplingParams(max_tokens=9))  # an id that is no byte does not block the stream
    assert seq.append(300, tok) == ("", None) and seq.append(ord("a"), tok) == ("\ufffda", None)


WORDS = ["long", "context", "Grüße", "世界", "END", "ring", "é", "\n", "attention", "EN"]


def _tokenizer(kind):
    if kind == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dist.models.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE())
    if kind == "bytelevel":  # Llama-3 / GPT-2 style: tokens are byte strings, a character may span tokens
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece style: spaces as a marker the decoder turns back into spaces, not at the text's start
        tok.pre_tokenizer, tok.decoder, alphabet = pre_tokenizers.Metaspace(), decoders.Metaspace(), []
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return HFTokenizer(tok, tok.token_to_id("<s>"), tok.token_to_id("</s>"))


@pytest.mark.parametrize("kind", ["byte", "bytelevel", "metaspace"])
def test_streamed_text_equals_decoding_the_whole_output_at_a_cost_per_token(kind):
    """Incremental detokenization: what streams is always a prefix of decoding the whole output (stop string
    cut off), ends equal to it, and each token decodes a few tokens, not the output so far."""
    import random

    tok = _tokenizer(kind)
    rng = random.Random(0)
    text = "".join(rng.choice(WORDS) + rng.choice([" ", ""]) for _ in range(120))
    ids = tok.encode(text, add_bos=False)
    if kind == "byte":  # an id that is no byte, and bytes that break or start UTF-8 characters (a model's output)
        for at in sorted(rng.sample(range(len(ids)), 40), reverse=True):
            ids[at:at] = [rng.choice([300, 0x80, 0xBF, 0xC3, 0xCA, 0xE4, 0xF0, 0xFF])]
        ids[9:9] = [ord("a"), 0xFF, 0x80, 0xFF, 0xCA, 0xA9]  # broken bytes, then a character they do not break
    decoded = []

    class Counting:
        eos_id = tok.eos_id

        @staticmethod
        def decode(x):
            decoded.append(len(x))
            return tok.decode(x)

    for stop in ([], ["END"]):
        seq, streamed, decoded[:] = Sequence(1, [tok.bos_id], SamplingParams(max_tokens=len(ids), stop=stop)), "", []
        for i in ids:
            delta, finish = seq.append(i, Counting)
            streamed += delta
            whole = tok.decode(seq.output)
            reference = whole[:whole.find("END")] if stop and "END" in whole else whole
            assert reference.startswith(streamed)
            if finish:
                break
        assert finish == ("stop" if stop else "length") and streamed == seq.text == reference
        assert sum(decoded) <= 12 * len(seq.output), (sum(decoded), len(seq.output))  # whole decodes: ~n^2 / 2


# ---------------------------------------------------------------- KV transfer (in-process link)

class _Corrupting(LocalChannel):
    """A link that alters the packed pages of layer `layer` in transit."""

    def __init__(self, inbox, outbox, fn, layer):
        super().__init__(inbox, outbox, timeout_s=10)
        self.fn, self.layer, self.layers_seen = fn, layer, 0

    def send_tensor(self, t):
        if t.dim() == 5:  # a packed layer [2, pages, block_size, heads_kv, head_dim]
            t = t.clone()
            if self.layers_seen == self.layer:
                self.fn(t)
            self.layers_seen += 1
        super().send_tensor(t)


def _transfer_setup(generation_rx=0, corrupt=None):
    """Two caches joined by an in-process link; `corrupt` = (fn, layer) alters that layer's pages in transit."""
    model = build_model("tiny", seed=0)
    layout = KVLayout.of(model.config, 4, torch.float32)
    src, dst = PagedKVCache(layout, 16), PagedKVCache(layout, 16)
    src.k.normal_(generator=torch.Generator().manual_seed(0))
    src.v.normal_(generator=torch.Generator().manual_seed(1))
    tx_ch, rx_ch = LocalChannel.pair(timeout_s=10)
    if corrupt:
        tx_ch = _Corrupting(tx_ch.inbox, tx_ch.outbox, *corrupt)
    got = []
    done = threading.Event()
    receiver = KVReceiver(rx_ch, dst, generation_rx, lambda seq: (got.append(seq), done.set()))
    sender = KVSender(tx_ch, src, generation=0, heartbeat_s=0.05)
    return src, dst, sender, receiver, got, done


def test_transferred_kv_equals_the_source_pages():
    src, dst, sender, receiver, got, done = _transfer_setup()
    dst.manager.allocate(3)  # the receiver's pages differ from the sender's
    seq = Sequence(5, list(range(10)), SamplingParams(), decode_rank=2, output=[7], blocks=[4, 9, 1], n_cached=10)
    t = sender.send(seq)
    assert done.wait(10)
    sender.close()
    receiver.thread.join(10)
    # layers x pages x block_size x (k, v) x heads_kv * head_dim x fp32 bytes
    assert t.state is KVPoll.DONE and t.nbytes == 2 * 3 * 4 * 2 * 64 * 4
    rseq = got[0]
    assert (rseq.rid, rseq.prompt, rseq.output, rseq.n_cached) == (5, seq.prompt, [7], 10)
    for a, b in zip(rseq.blocks, [4, 9, 1]):
        assert torch.equal(dst.k[:, a], src.k[:, b]) and torch.equal(dst.v[:, a], src.v[:, b])


def test_stale_generation_is_refused_and_never_delivered():
    src, dst, sender, receiver, got, done = _transfer_setup(generation_rx=1)
    t = sender.send(Sequence(5, [1, 2, 3], SamplingParams(), 2, output=[4], blocks=[0], n_cached=3))
    sender.close()
    receiver.thread.join(10)
    assert t.state is KVPoll.FAILED and "stale" in t.error
    assert got == [] and dst.manager.num_free == 16


def _swap_pages(t):
    t[:, [0, 1]] = t[:, [1, 0]]


@pytest.mark.parametrize("fn", [
    lambda t: t.view(-1)[37].add_(1e-3),           # one value off in its last bits
    _swap_pages,                                    # two pages in each other's place
    lambda t: t[1].copy_(t[0]),                     # V replaced by K
    lambda t: t[:, 0, 0].copy_(t[:, 0, 0].flip(1)),  # a token's two KV heads swapped
    lambda t: t.view(torch.int32).view(-1)[5].bitwise_xor_(1 << 30),  # one flipped bit
])
@pytest.mark.parametrize("layer", [0, 1])
def test_corrupted_kv_is_refused_and_never_delivered(fn, layer):
    src, dst, sender, receiver, got, done = _transfer_setup(corrupt=(fn, layer))
    t = sender.send(Sequence(5, list(range(10)), SamplingParams(), 2, output=[4], blocks=[4, 9, 1], n_cached=10))
    sender.close()
    receiver.thread.join(10)
    assert t.state is KVPoll.FAILED and "corrupted" in t.error
    assert got == [] and dst.manager.num_free == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_checksum_sees_one_changed_value_in_any_layer_or_row_order(dtype):
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 3, 4, 2, 8, generator=gen).to(dtype) for _ in range(3)]

    def total(ls):
        acc = None
        for x in ls:
            acc = checksum(x, acc)
        return int(acc)

    base = total(layers)
    assert base == total([x.clone() for x in layers])  # deterministic
    for i in range(3):
        for pos in (0, 17, layers[i].numel() - 1):
            changed = [x.clone() for x in layers]
            changed[i].view(-1)[pos] += 1
            assert total(changed) != base, (i, pos)
    assert total(layers[::-1]) != base  # layers out of order
    assert total([x.flip(2) for x in layers]) != base  # token rows out of order
    assert total([x.flip(3) for x in layers]) != base  # KV heads swapped within each row


def test_kv_checksum_is_the_same_in_chunks(monkeypatch):
    import dist.disagg.transfer as transfer

    x = torch.randn(2, 5, 16, 2, 32, generator=torch.Generator().manual_seed(1))
    whole = int(transfer.checksum(x))
    monkeypatch.setattr(transfer, "CHECK_WORDS", 7 * 128)  # 7 rows of 64 fp32 values (128 words) at a time
    assert int(transfer.checksum(x)) == whole


def test_layout_mismatch_refused_on_both_sides():
    model = build_model("tiny", seed=0)
    a, b = KVLayout.of(model.config, 16, torch.float32), KVLayout.of(model.config, 8, torch.float32)
    tx, rx = LocalChannel.pair(timeout_s=10)
    errors = []

    def decode_side():
        try:
            handshake_recv(rx, b)
        except ValueError as e:
            errors.append(str(e))

    th = threading.Thread(target=decode_side)
    th.start()
    with pytest.raises(ValueError, match="block_size"):
        handshake_send(tx, a)
    th.join(10)
    assert len(errors) == 1 and "block_size" in errors[0]


# ---------------------------------------------------------------- whole worker loops

def run_workers(mode, requests, num_blocks=64, chunk_tokens=5, max_batch=8):
    """Serve `requests` (prompt, SamplingParams) on worker loops in threads, as ranks 1 (prefill) and 2
    (decode), or two colocated workers; returns {rid: (text, tokens, finish)} and the final reports."""
    model = build_model("tiny", seed=0)
    tok = ByteTokenizer()
    layout = KVLayout.of(model.config, 4, torch.float32)
    roles = Roles.from_config(ServeConfig(mode=mode), 3)
    kv_tx, kv_rx = LocalChannel.pair(timeout_s=30)
    workers, ctrls = {}, {}
    for rank in roles.workers:
        mine, theirs = LocalChannel.pair(timeout_s=30)
        cache = PagedKVCache(layout, num_blocks)
        prefills, decodes = roles.phases(rank)
        senders = {2: KVSender(kv_tx, cache, 0)} if mode == "disaggregated" and rank == 1 else {}
        w = Worker(rank, prefills=prefills, decodes=decodes, runner=Runner(model, cache), tokenizer=tok, ctrl=theirs,
                   senders=senders, max_batch=max_batch, chunk_tokens=chunk_tokens)
        if mode == "disaggregated" and rank == 2:
            w.receivers = [KVReceiver(kv_rx, cache, 0, w.deliver)]
        workers[rank], ctrls[rank] = w, mine
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers.values()]
    for th in threads:
        th.start()
    for rid, (prompt, params) in enumerate(requests):
        d = roles.decode[rid % len(roles.decode)] if mode == "disaggregated" else roles.workers[rid % 2]
        p = roles.prefill[0] if mode == "disaggregated" else d
        ctrls[p].send(Request(rid, tok.encode(prompt), params, d))
    results = {rid: ["", 0, None] for rid in range(len(requests))}
    last = {}
    inbox = []

    def collect(ch):  # a worker's reports, until its last one
        while not (report := ch.recv()).stopped:
            inbox.append(report)

    collectors = [threading.Thread(target=collect, args=(ch,), daemon=True) for ch in ctrls.values()]
    for th in collectors:
        th.start()
    deadline = time.monotonic() + 60
    while any(r[2] is None for r in results.values()) and time.monotonic() < deadline:
        while inbox:
            report: Report = inbox.pop(0)
            last[report.rank] = report
            for ev in report.events:
                results[ev.rid][0] += ev.text
                results[ev.rid][1] = max(results[ev.rid][1], ev.tokens)
                results[ev.rid][2] = ev.finish or results[ev.rid][2]
        time.sleep(0.01)
    for ch in ctrls.values():
        ch.send(Stop())
    for th in threads + collectors:
        th.join(30)
    assert not any(th.is_alive() for th in threads + collectors)
    return {rid: tuple(r) for rid, r in results.items()}, workers


def test_disaggregated_equals_colocated_equals_reference():
    model = build_model("tiny", seed=0)
    tok = ByteTokenizer()
    prompts = ["hello world", "a", "the quick brown fox jumps over", "x" * 40]
    reqs = [(p, SamplingParams(max_tokens=6 + i, temperature=0)) for i, p in enumerate(prompts)]
    reqs += [("sampled", SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3))]
    disagg, dw = run_workers("disaggregated", reqs)
    coloc, cw = run_workers("colocated", reqs)
    for rid, prompt in enumerate(prompts):
        want = tok.decode(reference_greedy(model, tok.encode(prompt), 6 + rid))
        assert disagg[rid] == coloc[rid] == (want, 6 + rid, "length"), rid
    assert disagg[4] == coloc[4] and disagg[4][1] == 8  # seeded sampling agrees across modes
    for w in (*dw.values(), *cw.values()):  # every page came back
        assert w.cache.manager.num_free == w.cache.manager.num_blocks


def test_out_of_pages_waits_instead_of_failing():
    """Four prompts that each need most of the pages run one after another, not crash."""
    reqs = [("y" * 20, SamplingParams(max_tokens=4, temperature=0)) for _ in range(4)]
    few, _ = run_workers("colocated", reqs, num_blocks=8)
    plenty, _ = run_workers("colocated", reqs, num_blocks=64)
    assert few == plenty and all(r[2] == "length" for r in few.values())


def test_a_worker_keeps_decoding_while_the_router_is_not_reading():
    """A report's send completes only once the router takes it (gloo point-to-point does), and the decode loop
    must not wait for that: with the router not reading, the worker still runs every step of the request;
    the reports it then gets carry the single-process greedy reference's text."""
    model, tok = build_model("tiny", seed=0), ByteTokenizer()
    cache = PagedKVCache(KVLayout.of(model.config, 4, torch.float32), 64)
    router_end, worker_end = LocalChannel.pair(timeout_s=30)
    reading = threading.Event()

    class HeldLink:  # the worker's end of the control link: a send returns once the router reads
        def send(self, obj):
            assert reading.wait(60)
            worker_end.send(obj)

        def recv(self):
            return worker_end.recv()

    class CountingRunner(Runner):
        steps = 0

        def decode(self, *args):
            CountingRunner.steps += 1
            return super().decode(*args)

    w = Worker(1, prefills=True, decodes=True, runner=CountingRunner(model, cache), tokenizer=tok,
               ctrl=HeldLink(), senders={}, max_batch=8, chunk_tokens=5)
    th = threading.Thread(target=w.run, daemon=True)
    th.start()
    router_end.send(Request(0, tok.encode("held"), SamplingParams(max_tokens=10, temperature=0), 1))
    deadline = time.monotonic() + 60
    while CountingRunner.steps < 9 and time.monotonic() < deadline:  # token 1 from the prompt, 2..10 decoded
        time.sleep(0.01)
    assert CountingRunner.steps == 9, "the worker waited for the router to read its reports"
    reading.set()
    text, finish = "", None
    while finish is None:
        for ev in router_end.recv().events:
            text, finish = text + ev.text, ev.finish
    assert (text, finish) == (tok.decode(reference_greedy(model, tok.encode("held"), 10)), "length")
    router_end.send(Stop())
    th.join(30)
    assert not th.is_alive()


# ---------------------------------------------------------------- a prefill group (ring attention)

def _ring_prefill(rank, world, n_tokens):
    import torch.distributed as dist

    model = build_model("tiny", seed=0)
    cache = PagedKVCache(KVLayout.of(model.config, 4, torch.float32), 32)
    runner = Runner(model, cache, dist.new_group(list(range(world))), tuple(range(world)))
    tokens = torch.randint(0, 512, (n_tokens,), generator=torch.Generator().manual_seed(2)).tolist()
    if rank == 0:
        blocks = cache.manager.allocate(KVLayout.of(model.config, 4, torch.float32).blocks_for(n_tokens))
        logits = runner.prefill(tokens, 0, blocks)
        runner.close()
        return logits, cache.pack(blocks), blocks
    runner.follow()
    return None


def test_prefill_group_matches_one_rank():
    """A prompt prefilled by 2 ranks with ring attention: the leader's pages and last logits equal a single
    rank's prefill (the length is not a multiple of 2 x 2, so the padding is exercised)."""
    from tests.multirank import run_ranks

    n = 37
    logits, packed, blocks = run_ranks(_ring_prefill, 2, n, timeout_s=120)[0]
    model = build_model("tiny", seed=0)
    cache = PagedKVCache(KVLayout.of(model.config, 4, torch.float32), 32)
    tokens = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    local = cache.manager.allocate(len(blocks))
    want = Runner(model, cache).prefill(tokens, 0, local)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    ref_packed = cache.pack(local)
    pos = torch.arange(n)  # compare the filled positions only (the last page's tail is unused)
    got = packed.flatten(2, 3)[:, :, pos]
    torch.testing.assert_close(got, ref_packed.flatten(2, 3)[:, :, pos], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the real link: gloo point-to-point

def _gloo_transfer(rank, world):
    """Rank 0 prefills, rank 1 decodes: a handshake with different block sizes, then a matching one and a
    transfer. Returns (the refusal, what was sent | what arrived)."""
    import torch.distributed as dist

    from dist.disagg.channel import DistChannel

    fwd, back = dist.new_group([0, 1]), dist.new_group([0, 1])
    model = build_model("tiny", seed=0)
    ch = DistChannel(1 - rank, fwd if rank == 0 else back, back if rank == 0 else fwd)
    handshake = handshake_send if rank == 0 else handshake_recv
    try:
        handshake(ch, KVLayout.of(model.config, 4 if rank == 0 else 8, torch.float32))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    layout = KVLayout.of(model.config, 4, torch.float32)
    handshake(ch, layout)
    cache = PagedKVCache(layout, 8)
    cache.k.normal_(generator=torch.Generator().manual_seed(rank))
    cache.v.normal_(generator=torch.Generator().manual_seed(rank + 10))
    if rank == 0:
        sender = KVSender(ch, cache, generation=0)
        t = sender.send(Sequence(3, list(range(6)), SamplingParams(), 1, output=[1], blocks=[5, 2], n_cached=6))
        while t.state in (KVPoll.WAITING, KVPoll.TRANSFERRING):
            time.sleep(0.001)
        sender.close()
        return refusal, (t.state, cache.pack([5, 2]))
    got = []
    receiver = KVReceiver(ch, cache, 0, got.append)
    receiver.thread.join(60)
    return refusal, (got[0].blocks, cache.pack(got[0].blocks))


def test_gloo_link_refuses_a_layout_mismatch_then_moves_kv_intact():
    from tests.multirank import run_ranks

    (refused0, (state, sent)), (refused1, (blocks, received)) = run_ranks(_gloo_transfer, 2, timeout_s=120)
    assert "block_size" in refused0 and "block_size" in refused1  # both ranks refuse
    assert state is KVPoll.DONE and len(blocks) == 2
    assert torch.equal(sent, received)


# ---------------------------------------------------------------- request parsing (no server)

@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "ignore_eos": "no"}, 400, "ignore_eos"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x" * 60, "max_tokens": 10}, 400, "prompt"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": 3, "prompt": "x"}, 400, "model"),
])
def test_parse_request_names_the_field(body, status, param):
    from dist.disagg.api import ApiError, parse_request

    with pytest.raises(ApiError) as e:
        parse_request(body, "messages" in body, "tiny", ByteTokenizer(), max_model_len=64)
    assert (e.value.status, e.value.param) == (status, param)
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_prompt_plain_template_and_params():
    from dist.disagg.api import parse_request

    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = {"model": "tiny", "messages": messages,
            "max_completion_tokens": 5, "temperature": 0, "stop": "\n", "seed": 4}
    prompt, params, stream = parse_request(body, True, "tiny", tok, max_model_len=256)
    assert tok.decode(prompt) == "system: Be brief.\nuser: Hi\nassistant:"
    assert (params.max_tokens, params.temperature, params.stop, params.seed, stream) == (5, 0.0, ["\n"], 4, False)


def test_chat_template_from_the_tokenizer():
    from dist.disagg.api import chat_prompt

    class Tok:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"

    assert chat_prompt([{"role": "user", "content": "Hi"}], Tok()) == "<user>Hi<assistant>"

    from dist.disagg.api import ApiError

    class Strict:
        chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"

    with pytest.raises(ApiError, match="user first"):
        chat_prompt([{"role": "system", "content": "x"}], Strict())


def test_model_from_a_checkpoint_folder(tmp_path):
    """model.path = a saved model folder (what `train` checkpoints hold): same weights, the folder's name as id."""
    from dist.config import load_config
    from dist.models import save_hf
    from dist.serve import load_model

    model = build_model("tiny", seed=5)
    folder = tmp_path / "step-3"
    save_hf(model, folder)
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0].content }}"}')
    loaded, tok, name = load_model(load_config(None, [f"model.path={folder}"]), "cpu")
    assert name == "step-3" and tok.chat_template == "{{ messages[0].content }}"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_requests_that_finish_at_their_first_token_free_every_page():
    """max_tokens = 1 and a stop string hit at once: the KV streamed during the prompt is dropped on both sides."""
    reqs = [("one token", SamplingParams(max_tokens=1, temperature=0)), ("again", SamplingParams(max_tokens=1)),
            ("long enough", SamplingParams(max_tokens=5, temperature=0))]
    out, workers = run_workers("disaggregated", reqs)
    assert [r[1:] for r in out.values()] == [(1, "length"), (1, "length"), (5, "length")]
    assert all(w.cache.manager.num_free == w.cache.manager.num_blocks for w in workers.values())


def _api_with_queued_events(events_of):
    """The HTTP app over a stand-in router whose every request already holds all its events (events_of(prompt,
    params) -> list of Event): the stream reads them as a client that fell behind would find them."""
    from fastapi.testclient import TestClient

    from dist.disagg.api import Metrics, build_app
    from dist.disagg.router import Handle

    class QueuedRouter:
        healthy, dead = True, {}

        def submit(self, prompt, params):
            h = Handle(1, prompt, params, need=1)
            for ev in events_of(prompt, params):
                h.events.put_nowait(ev)
            return h

        def abort(self, h):
            pass

    app = build_app(QueuedRouter(), "tiny", ByteTokenizer(), ServeConfig(), 256, Metrics())
    return TestClient(app)


def _sse_chunks(client, body):
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def reference_events(prompt: str, max_tokens: int, rid: int = 1):
    """The events a worker reports for the single-process greedy reference's tokens, and those tokens."""
    from dist.disagg.channel import Event

    model, tok = build_model("tiny", seed=0), ByteTokenizer()
    want = reference_greedy(model, tok.encode(prompt), max_tokens)
    seq, out = Sequence(rid, tok.encode(prompt), SamplingParams(max_tokens, temperature=0, ignore_eos=True)), []
    for t in want:
        delta, finish = seq.append(t, tok)
        out.append(Event(rid, delta, len(seq.output), finish))
    return out, want


def test_a_stream_behind_gets_the_waiting_tokens_in_one_chunk():
    """Tokens that queued up while the stream was not reading go out as one SSE chunk (not one per token); its
    text, and the non-streaming answer's, equal the single-process greedy reference's."""
    import json

    from dist.disagg.channel import Event

    tok = ByteTokenizer()
    ref, want = reference_events("behind", 12)

    def events_of(prompt, params):
        return ref

    client = _api_with_queued_events(events_of)
    body = {"model": "tiny", "prompt": "behind", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    chunks = _sse_chunks(client, body)
    assert chunks[-1] == "[DONE]" and len(chunks) == 2, chunks
    choice = json.loads(chunks[0])["choices"][0]
    assert choice["text"] == tok.decode(want) and choice["finish_reason"] == "length"
    plain = client.post("/v1/completions", json=body).json()
    assert plain["choices"][0]["text"] == tok.decode(want) and plain["usage"]["completion_tokens"] == 12

    # a worker error after some tokens: those tokens go out first, then the error event, and no [DONE]
    client = _api_with_queued_events(lambda p, s: [*events_of(p, s)[:6], Event(1, finish="error", error="boom")])
    chunks = _sse_chunks(client, body)
    sent = "".join(ev.text for ev in ref[:6])
    assert sent and json.loads(chunks[0])["choices"][0]["text"] == sent
    assert json.loads(chunks[1])["error"]["code"] == "worker_error" and len(chunks) == 2


def test_router_keeps_token_order_across_the_two_workers_links():
    """The prefill worker's first token and the decode worker's next ones come over separate links; when the
    decode worker's overtake it, the stream still carries the reference's text in order."""
    from dist.disagg.api import Metrics
    from dist.disagg.router import Router

    class Link:
        def send(self, msg):
            pass

    roles = Roles.from_config(ServeConfig(), 3)  # router 0, prefill 1, decode 2
    router = Router(roles, {1: Link(), 2: Link()}, ServeConfig(), Metrics(), block_size=4)
    events, want = reference_events("order", 6)
    tok = ByteTokenizer()
    h = router.submit(tok.encode("order"), SamplingParams(6, temperature=0, ignore_eos=True))
    for ev in events:
        ev.rid = h.rid
    router._on_report(Report(2, events[1:3]))  # decode worker: tokens 2 and 3, before the first arrived
    router._on_report(Report(1, events[:1]))   # prefill worker: token 1
    router._on_report(Report(2, events[3:]))
    got = [h.events.get_nowait() for _ in range(h.events.qsize())]
    assert [ev.tokens for ev in got] == [1, 2, 3, 4, 5, 6]
    assert "".join(ev.text for ev in got) == tok.decode(want) and got[-1].finish == "length" and h.done
