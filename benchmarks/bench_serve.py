"""Disaggregated vs colocated serving under Poisson arrivals of long and short prompts (DistServe's question).

    python benchmarks/bench_serve.py                      # tiny model, 3 ranks each (1 router + 2 workers)
    python benchmarks/bench_serve.py --rates 1 2 --requests 20

Both modes run as torchrun jobs of the same shape (router + 2 workers: prefill + decode, or two
colocated workers with chunked prefill; serve.pin_cores gives each worker its own core, the router
shares the second worker's, and this client runs beside the router), one job at a time: warmed up,
measured idle (one request at a time: a short prompt's TPOT, a long prompt's TTFT), then loaded with
the same Poisson arrivals at each rate over the streaming API, then idle again. Per
request: TTFT (the first streamed chunk), ITL (gaps between chunks: one per token while the client
keeps up, the tokens since the last chunk when it fell behind), TPOT ((E2E - TTFT) / (tokens - 1)), E2E.

Short requests' TPOT p99 against idle TPOT mixes three things: the long prompts' interference (what
disaggregation removes), continuous batching (several requests decode together) and noise of the
shared cores. So each rate also runs a control: the same arrivals with every long prompt replaced by
a short one (same count and times of requests); short TPOT p99 with the long prompts over the same
requests' TPOT p99 in the control is the interference ratio, and the idle run's own TPOT p99 / p50
(the noise floor) says how far apart two quiet figures already are.

The TPOT target has a test of its own: short requests while a stream of long prompts that only prefill
(one output token) arrives beside them, against the same short requests alone; their TPOT p99 against
idle TPOT and against the control's p99.

The SLO is relative to idle: TTFT <= slo_ttft x idle long-prompt TTFT, TPOT <= slo_tpot x the slower
of idle short- and long-prompt TPOT (a long prompt's tokens attend over its whole context), so a
request of either kind alone meets it with at least that margin; from the slower mode's idle figures,
so both modes face the same bar; each mode's idle figure is the better of one run before and one
after the load. Attainment is the share of requests meeting both, goodput the highest rate of the
grid up to which every rate has attainment >= 90% (a rate that passes above one that failed is
noise, not capacity). As in DistServe, goodput is also reported with both SLOs scaled together
(--slo-scales), since what separates the modes depends on how tight the bar is. The KV transfer
share of TTFT comes from the server's own histograms (/metrics). Writes results/bench_serve.json, a
dated markdown table and a plot of attainment against rate. On CPU only ratios mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, free_port, machine, today, write_results  # noqa: E402



def start(mode: str, nproc: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "dist.launch", "serve", "--set", f"serve.port={port}", "--set", f"serve.mode={mode}",
           "--set", "serve.request_timeout_s=300", *[a for e in extra for a in ("--set", e)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{mode} server did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, long: bool) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    times, ok = [], False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                ok = True
            elif line.startswith("data: "):
                times.append(time.perf_counter() - t0)
    e2e = time.perf_counter() - t0
    ttft = times[0] if times else e2e
    return {"long": long, "ok": ok and bool(times), "ttft": ttft, "e2e": e2e,
            "tpot": (e2e - ttft) / max(1, max_tokens - 1), "itl": list(np.diff(times))}


async def load(url: str, rate: float, n: int, long_share: float, long_len: int, short_len: int, max_tokens: int,
               seed: int, control: bool = False) -> list[dict]:
    """Poisson arrivals; `control` replaces every long prompt by a short one (its "long" still marks the slot)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    kinds = rng.random(n) < long_share
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        for gap, is_long in zip(gaps, kinds):
            await asyncio.sleep(gap)
            real = is_long and not control
            prompt = ("L" if real else "s") + "x" * ((long_len if real else short_len) - 2)
            tasks.append(asyncio.create_task(one(client, url, prompt, max_tokens, bool(is_long))))
        return await asyncio.gather(*tasks)


async def stream_of_long_prompts(url: str, args, seed: int, with_long: bool) -> list[dict]:
    """The TPOT target's own test: short requests (Poisson, --stream-short-rate) while long prompts that only
    prefill (max_tokens 1, Poisson, --stream-long-rate) arrive beside them, or (control) the same short
    requests alone. Returns every request (long ones marked)."""
    rng = np.random.default_rng(seed)
    n = args.stream_requests
    short_at = np.cumsum(rng.exponential(1.0 / args.stream_short_rate, n))
    long_at = np.cumsum(rng.exponential(1.0 / args.stream_long_rate, int(short_at[-1] * args.stream_long_rate) + 1))
    arrivals = sorted([(t, False) for t in short_at] + ([(t, True) for t in long_at] if with_long else []))
    async with httpx.AsyncClient(timeout=600) as client:
        tasks, t0 = [], time.perf_counter()
        for at, is_long in arrivals:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            prompt = ("L" + "x" * (args.long_len - 2)) if is_long else ("s" + "x" * (args.short_len - 2))
            tasks.append(asyncio.create_task(one(client, url, prompt, 1 if is_long else args.max_tokens, is_long)))
        return await asyncio.gather(*tasks)


def idle(url: str, args) -> dict:
    """One request at a time: short prompts' TPOT (median of --idle-requests), long prompts' TTFT and TPOT (median
    of 5; a long prompt's tokens attend over its whole context, so they come slower than a short one's)."""
    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            short = [await one(client, url, "s" + "x" * (args.short_len - 2), args.max_tokens, False)
                     for _ in range(args.idle_requests)]
            long = [await one(client, url, "L" + "x" * (args.long_len - 2), args.max_tokens, True) for _ in range(5)]
            return short, long
    short, long = asyncio.run(run())
    return {"tpot": float(np.median([r["tpot"] for r in short])), "tpots": [r["tpot"] for r in short],
            "ttft_long": float(np.median([r["ttft"] for r in long])),
            "tpot_long": float(np.median([r["tpot"] for r in long])),
            "ttft_short": float(np.median([r["ttft"] for r in short]))}


def metric_sum(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(results: list[dict], slo_ttft: float, slo_tpot: float) -> dict:
    itl = [x for r in results for x in r["itl"]]
    met = [r["ok"] and r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot for r in results]
    short_tpot = [r["tpot"] for r in results if not r["long"]]
    out = {"n": len(results), "failed": sum(not r["ok"] for r in results), "attainment": float(np.mean(met)),
           "short_tpot_p99": pct(short_tpot, 99)}
    for key in ("ttft", "tpot", "e2e"):
        xs = [r[key] for r in results]
        out[f"{key}_p50"], out[f"{key}_p99"] = pct(xs, 50), pct(xs, 99)
    out["itl_p50"], out["itl_p99"] = pct(itl, 50), pct(itl, 99)
    return out


def goodput(attainment: dict[float, float]) -> float:
    """The highest rate up to which every rate of the grid meets the SLO for >= 90% of requests (0: none)."""
    best = 0.0
    for rate in sorted(attainment):
        if attainment[rate] < 0.9:
            break
        best = rate
    return best


def ratio_text(gd: float, gc: float, lowest: float) -> str:
    """Disaggregated / colocated goodput; a mode that met no rate of the grid is below its lowest rate."""
    if gd and gc:
        return f"{gd / gc:.2f}"
    if gc:
        return f"< {lowest / gc:.2f}"
    return f"> {gd / lowest:.2f}" if gd else "n/a (neither met a rate)"


def control_cols(s: dict, idle_tpot: float) -> str:
    if "control_short_tpot_p99" not in s:
        return "- | -"
    return f"{s['short_tpot_p99'] / s['control_short_tpot_p99']:.2f} | {s['control_short_tpot_p99'] / idle_tpot:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.3, 16.0],
                    help="requests per second (steps of sqrt(2): a 2x goodput ratio shows on the grid)")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--idle-requests", type=int, default=20, help="short requests one at a time for idle TPOT")
    ap.add_argument("--control", nargs="*", default=["colocated", "disaggregated"],
                    help="modes that also run the short-only control at each rate")
    ap.add_argument("--long-share", type=float, default=0.25)
    ap.add_argument("--long-len", type=int, default=2048, help="long prompt tokens (byte tokenizer: characters)")
    ap.add_argument("--short-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slo-ttft", type=float, default=3.0, help="x idle long-prompt TTFT")
    ap.add_argument("--slo-tpot", type=float, default=2.0, help="x idle TPOT")
    ap.add_argument("--slo-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                    help="both SLOs scaled together for the goodput-by-scale table")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="colocated chunked-prefill size")
    ap.add_argument("--pin-cores", type=int, default=1, help="serve.pin_cores in both modes (1: a core a worker)")
    ap.add_argument("--stream-requests", type=int, default=96, help="short requests of the long-prompt stream test")
    ap.add_argument("--stream-short-rate", type=float, default=2.0, help="their rate (req/s)")
    ap.add_argument("--stream-long-rate", type=float, default=4.0,
                    help="long prompts (prefill only) per second beside them")
    ap.add_argument("--out", default="bench_serve")
    args = ap.parse_args(argv)
    if min(args.rates + [args.stream_short_rate, args.stream_long_rate]) <= 0:
        ap.error("--rates, --stream-short-rate and --stream-long-rate must be > 0")

    load_start = os.getloadavg()[0]
    modes = ("colocated", "disaggregated")
    cores = sorted(os.sched_getaffinity(0))
    runs = {mode: {"rates": {}} for mode in modes}
    for mode in modes:  # one job at a time, so nothing of the other mode's job shares the cores
        os.sched_setaffinity(0, cores)  # the job plans its cores from all of them
        proc, url = start(mode, 3, [f"serve.chunk_tokens={args.chunk_tokens}",
                                    f"serve.pin_cores={'true' if args.pin_cores else 'false'}"])
        try:
            if args.pin_cores:  # the client beside the router (on the last core), away from the decode worker
                os.sched_setaffinity(0, cores[-1:])
            idle(url, args)  # warm-up
            base = runs[mode]["idle"] = idle(url, args)
            print(f"{mode}: idle TPOT {base['tpot'] * 1e3:.1f} ms, idle long TTFT {base['ttft_long'] * 1e3:.0f} ms",
                  flush=True)
            for rate in args.rates:
                mix = dict(url=url, rate=rate, n=args.requests, long_share=args.long_share, long_len=args.long_len,
                           short_len=args.short_len, max_tokens=args.max_tokens, seed=int(rate * 1000))
                kv0, ttft0 = (metric_sum(url, f"dist_serve_{m}_sum") for m in ("kv_transfer_seconds", "ttft_seconds"))
                results = asyncio.run(load(**mix))
                kv1, ttft1 = (metric_sum(url, f"dist_serve_{m}_sum") for m in ("kv_transfer_seconds", "ttft_seconds"))
                share = (kv1 - kv0) / max(ttft1 - ttft0, 1e-9)
                control = asyncio.run(load(**mix, control=True)) if mode in args.control else None
                runs[mode]["rates"][rate] = {"results": results, "kv_share_of_ttft": share, "control": control}
                print(f"  {mode} rate {rate}: done", flush=True)
            runs[mode]["stream"] = {
                part: asyncio.run(stream_of_long_prompts(url, args, seed=7, with_long=part == "long"))
                for part in ("long", "control")}
            print(f"  {mode} stream of long prompts: done", flush=True)
            after = idle(url, args)  # idle again: a figure caught while the machine was busy would set the bar
            runs[mode]["idle_before"] = runs[mode]["idle"]
            tpots = runs[mode]["idle"]["tpots"] + after["tpots"]  # both quiet runs: how far apart idle figures lie
            runs[mode]["idle"] = {k: min(v, after[k]) for k, v in runs[mode]["idle"].items() if k != "tpots"}
            runs[mode]["idle"]["noise_p99_p50"] = pct(tpots, 99) / pct(tpots, 50)
            print(f"{mode}: idle TPOT after the load {after['tpot'] * 1e3:.1f} ms", flush=True)
        finally:
            stop(proc)
    os.sched_setaffinity(0, cores)

    # the bar from the slower mode's idle figures (each the better of its runs before and after the load), for the
    # slower kind of request: a long prompt alone has the longest TTFT and the slowest tokens
    slo_ttft = args.slo_ttft * max(run["idle"]["ttft_long"] for run in runs.values())
    slo_tpot = args.slo_tpot * max(max(run["idle"]["tpot"], run["idle"]["tpot_long"])
                                   for run in runs.values())
    table = {}
    for mode, run in runs.items():
        table[mode] = {"idle": run["idle"], "rates": {}}
        for rate, r in run["rates"].items():
            table[mode]["rates"][rate] = {**summarize(r["results"], slo_ttft, slo_tpot),
                                          "kv_share_of_ttft": r["kv_share_of_ttft"]}
            if r["control"] is not None:  # the same requests' short TPOT p99 with no long prompt anywhere
                table[mode]["rates"][rate]["control_short_tpot_p99"] = summarize(r["control"], slo_ttft,
                                                                                 slo_tpot)["short_tpot_p99"]
        table[mode]["goodput_rps"] = goodput({rate: s["attainment"] for rate, s in table[mode]["rates"].items()})
        tpots = {part: [r["tpot"] for r in rs if r["ok"] and not r["long"]] for part, rs in run["stream"].items()}
        table[mode]["stream"] = {f"{part}_tpot_{q}": pct(tpots[part], q) for part in tpots for q in (50, 99)}
        table[mode]["stream"]["failed"] = sum(not r["ok"] for rs in run["stream"].values() for r in rs)
        table[mode]["goodput_by_scale"] = {
            scale: goodput({rate: summarize(r["results"], scale * slo_ttft, scale * slo_tpot)["attainment"]
                            for rate, r in run["rates"].items()}) for scale in args.slo_scales}

    lines = [f"# bench_serve {today()}", "",
             f"Machine: {machine(load_start)} (other jobs share the machine); "
             "tiny model, 3 ranks per mode (router + 2 workers), CPU only. Ratios only.", "",
             f"Mix: {args.long_share:.0%} long ({args.long_len} tokens), rest short ({args.short_len}); "
             f"{args.max_tokens} output tokens; {args.requests} requests per rate; colocated chunk "
             f"{args.chunk_tokens} tokens; serve.pin_cores = {bool(args.pin_cores)}.",
             f"SLO: TTFT <= {slo_ttft * 1e3:.0f} ms ({args.slo_ttft}x idle long TTFT), TPOT <= {slo_tpot * 1e3:.1f} ms "
             f"({args.slo_tpot}x the slower of idle short and long TPOT), both from the slower mode's idle run.", "",
             "Short TPOT p99 / idle = (/ control: the long prompts' interference) x (control / idle: batching and "
             "core sharing); the noise floor (idle TPOT p99 / p50) is under the table.", "",
             "| mode | rate/s | attain | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms | E2E p50/p99 s | "
             "short TPOT p99 / idle | KV share of TTFT | failed | short TPOT p99 / control | control / idle |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in table:
        idle_tpot = table[mode]["idle"]["tpot"]
        for rate, s in table[mode]["rates"].items():
            lines.append(f"| {mode} | {rate:g} | {s['attainment']:.2f} | {s['ttft_p50'] * 1e3:.0f} / "
                         f"{s['ttft_p99'] * 1e3:.0f} | {s['tpot_p50'] * 1e3:.1f} / {s['tpot_p99'] * 1e3:.1f} | "
                         f"{s['itl_p50'] * 1e3:.1f} / {s['itl_p99'] * 1e3:.1f} | {s['e2e_p50']:.2f} / "
                         f"{s['e2e_p99']:.2f} | {s['short_tpot_p99'] / idle_tpot:.2f} | "
                         f"{s['kv_share_of_ttft']:.1%} | {s['failed']} | {control_cols(s, idle_tpot)} |")
    d, c = table["disaggregated"], table["colocated"]
    ratio = ratio_text(d["goodput_rps"], c["goodput_rps"], min(args.rates))
    lines += ["", f"Idle TPOT short / long: disaggregated {d['idle']['tpot'] * 1e3:.1f} / "
                  f"{d['idle']['tpot_long'] * 1e3:.1f} ms, colocated {c['idle']['tpot'] * 1e3:.1f} / "
                  f"{c['idle']['tpot_long'] * 1e3:.1f} ms; noise floor (idle TPOT p99 / p50 over "
                  f"{2 * args.idle_requests} one-at-a-time short requests): disaggregated "
                  f"{d['idle']['noise_p99_p50']:.2f}, colocated {c['idle']['noise_p99_p50']:.2f}.",
              f"Goodput (highest rate up to which every rate has >= 90% attainment): disaggregated "
              f"{d['goodput_rps']:g}/s, colocated {c['goodput_rps']:g}/s, ratio {ratio}.", "",
              "Goodput with both SLOs scaled (scale 1 = the SLO above):", "",
              "| SLO scale | TTFT ms | TPOT ms | disaggregated req/s | colocated req/s | ratio |",
              "|---|---|---|---|---|---|"]
    for scale in args.slo_scales:
        gd, gc = d["goodput_by_scale"][scale], c["goodput_by_scale"][scale]
        lines.append(f"| {scale:g} | {scale * slo_ttft * 1e3:.0f} | {scale * slo_tpot * 1e3:.1f} | {gd:g} | {gc:g} "
                     f"| {ratio_text(gd, gc, min(args.rates))} |")
    lines += ["", f"Stream of long prompts (the TPOT target): {args.stream_requests} short requests at "
              f"{args.stream_short_rate:g}/s while {args.long_len}-token prompts that only prefill (1 output token) "
              f"arrive at {args.stream_long_rate:g}/s, and the same short requests alone (control).", "",
              "| mode | idle TPOT ms | control TPOT p50 / p99 ms | with long prompts p50 / p99 ms "
              "| p99 / idle | p99 / control p99 | failed |", "|---|---|---|---|---|---|---|"]
    for mode in table:
        st, idle_tpot = table[mode]["stream"], table[mode]["idle"]["tpot"]
        lines.append(f"| {mode} | {idle_tpot * 1e3:.1f} | {st['control_tpot_50'] * 1e3:.1f} / "
                     f"{st['control_tpot_99'] * 1e3:.1f} | {st['long_tpot_50'] * 1e3:.1f} / "
                     f"{st['long_tpot_99'] * 1e3:.1f} "
                     f"| {st['long_tpot_99'] / idle_tpot:.2f} | {st['long_tpot_99'] / st['control_tpot_99']:.2f} "
                     f"| {st['failed']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    def rows(results):  # per request, for the JSON
        return [{key: round(x[key], 5) if isinstance(x[key], float) else x[key]
                 for key in ("long", "ok", "ttft", "tpot", "e2e")} for x in results]

    per_request = {part: {m: {str(k): rows(v[part]) for k, v in r["rates"].items() if v[part] is not None}
                          for m, r in runs.items()} for part in ("results", "control")}
    write_results(args.out, {"args": vars(args), "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot}, "summary": table,
                             "requests": per_request["results"], "control_requests": per_request["control"],
                             "stream_requests": {m: {part: rows(rs) for part, rs in r["stream"].items()}
                                                 for m, r in runs.items()}},
                  text, indent=None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in table:
        rates = list(table[mode]["rates"])
        ax.plot(rates, [table[mode]["rates"][r]["attainment"] for r in rates], marker="o", label=mode)
    ax.axhline(0.9, color="grey", linestyle=":", label="90%")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("tiny model, CPU, 1 router + 2 workers")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{args.out}.png"), dpi=120)


if __name__ == "__main__":
    main()
