"""Sampling and the per-request sequence state that every worker (prefill or decode) advances.

    params = SamplingParams(max_tokens=16, temperature=0.0)          # 0: greedy
    seq = Sequence(rid=1, prompt=[...], params=params)
    token = sample(logits, params, step=len(seq.output))
    tokens = sample_batch(batch_logits, [s.params for s in seqs], [len(s.output) for s in seqs])
    delta, finish = seq.append(token, tokenizer)                      # text to stream, None | "stop" | "length"

Sampling with temperature > 0 draws from a generator seeded by (seed, step), so the same request gives
the same tokens whichever worker draws each of them (disaggregated and colocated agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0: greedy (argmax)
    top_p: float = 1.0            # nucleus: keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One token id from logits [vocab]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep a token when the mass before it is below top_p (the most likely token is always kept)
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator().manual_seed((params.seed * 1_000_003 + step) % (2 ** 63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of logits [batch, vocab], each as sample() draws it; the greedy rows with one argmax
    and one copy to the host for the whole batch (on a GPU, one sync per decode step, not one per request)."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [g if p.temperature == 0 else sample(logits[i], p, step)
            for i, (g, p, step) in enumerate(zip(greedy, params, steps))]


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass(eq=False)  # identity: a worker finds its own sequence in its queues
class Sequence:
    """One request as a worker sees it; travels from prefill to decode worker with its KV."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    decode_rank: int = -1
    output: list[int] = field(default_factory=list)
    text: str = ""          # the detokenized output so far (stop string cut off)
    sent: int = 0           # characters of `text` already streamed
    blocks: list[int] = field(default_factory=list)
    n_cached: int = 0       # positions whose KV is in `blocks`
    decoded: str = ""       # text of output[:read_end], whole characters only
    window_start: int = 0   # output[window_start:read_end] is decoded again beside each new token
    read_end: int = 0

    def append(self, token: int, tokenizer) -> tuple[str, str | None]:
        """Add a sampled token; return (text to stream now, finish reason or None).

        Detokenized incrementally (as vLLM does): each token decodes only the window since the last
        whole character, so a token costs the same at any output length; decoding the window with the
        token before it keeps what a tokenizer does at a text's start (a SentencePiece leading space)
        out of the difference."""
        self.output.append(token)
        finish = None
        if token == tokenizer.eos_id and not self.params.ignore_eos:
            self.output.pop()  # EOS is not part of the text
            finish = "stop"
        before = tokenizer.decode(self.output[self.window_start:self.read_end])
        new = tokenizer.decode(self.output[self.window_start:])[len(before):]
        start = len(self.decoded)
        # a trailing U+FFFD may be a character cut short: wait until text follows it, so the window always
        # starts on a character boundary and the text equals decoding the whole output (a model emitting
        # only broken UTF-8 grows the window; any whole character moves it on)
        if new and not new.endswith("\ufffd"):
            self.decoded += new
            self.window_start, self.read_end = self.read_end, len(self.output)
            new = ""
        text = self.decoded + new
        for s in self.params.stop:
            cut = text.find(s, max(0, start - len(s) + 1))  # earlier text was searched before
            if cut >= 0:
                text, finish = text[:cut], "stop"
        if finish is None and len(self.output) >= self.params.max_tokens:
            finish = "length"
        if finish is None:  # hold back a tail that may become a stop string, and the one character that may
            # still change: a trailing U+FFFD (an unfinished character; those before it are final)
            ready = min(len(text) - _holdback(text, self.params.stop), len(text) - 1 if new else len(text))
        else:
            ready = len(text)
        self.text = text
        delta = text[self.sent:max(ready, self.sent)]
        self.sent = max(ready, self.sent)
        return delta, finish
