#!/usr/bin/env python3
"""loadgen.py — load generator for `vlmd serve` (or any OpenAI-compatible server).

Sends streaming /v1/chat/completions requests at fixed concurrency levels (default 1, 4, 16, 64)
and reports, per level: requests, two aggregate rates, time to first token (TTFT) p50/p99 and
inter-token latency (ITL) p50/p99, and each rate's speed-up over concurrency 1:

  decode_tok/s  the rate at which the running streams advance: concurrency / mean ITL. This is the
                batched-decode figure (what llama.cpp's batched-bench reports as S_TG).
  out_tok/s     end to end: generated tokens over the span from the first token to the last, so
                the prefill of requests that start inside the span (their TTFT) counts against it.
Uses only the standard library (asyncio streams, HTTP/1.1, SSE parsing), so it runs anywhere.

    python3 bench/serve/loadgen.py --url http://127.0.0.1:8000 --model 2b-size \
        --concurrency 1,4,16,64 --max-tokens 64   # --requests N per level, default 2 x concurrency

Each request uses a different prompt (unique across levels too, so no level finds another level's
prompts in the server's prefix cache; the chat template's fixed system prefix is shared, as it is
between any two real clients), with --image an image, and ignore_eos with greedy
sampling so every request generates exactly --max-tokens tokens. Tokens are counted from the
final usage chunk (stream_options.include_usage); inter-token latency is the gap between
successive content chunks (the server sends one chunk per token unless a stop-string prefix or an
incomplete UTF-8 character is held back).
"""
import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
import urllib.parse


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(host, port, path, body, headers):
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n%s\r\n") % (
        path, host, port, len(data), "".join("%s: %s\r\n" % kv for kv in headers.items()))
    writer.write(head.encode() + data)
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    if status != 200:
        rest = await reader.read()
        writer.close()
        raise RuntimeError("HTTP %d: %s" % (status, rest[:300]))

    async def body_bytes():
        if not chunked:
            while True:
                b = await reader.read(65536)
                if not b:
                    return
                yield b
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            b = await reader.readexactly(size)
            await reader.readline()
            yield b

    buf = b""
    stamps, usage = [], None
    async for b in body_bytes():
        buf += b
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if not ev.startswith(b"data: "):
                continue
            payload = ev[6:]
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                delta = ch.get("delta", {})
                if delta.get("content") or ch.get("text"):
                    stamps.append(time.perf_counter())
    writer.close()
    return t0, stamps, usage


async def run_level(args, level, conc, n_requests, image_url):
    u = urllib.parse.urlparse(args.url)
    host, port = u.hostname, u.port or 80
    headers = {"Authorization": "Bearer " + args.api_key} if args.api_key else {}
    queue = list(range(n_requests))
    results, errors = [], []

    async def worker():
        while queue:
            i = queue.pop()
            text = "Request %d.%d. %s" % (level, i, args.prompt)
            content = [{"type": "text", "text": text}]
            if image_url:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
            body = {"model": args.model, "messages": [{"role": "user", "content": content}],
                    "max_tokens": args.max_tokens, "temperature": 0, "top_k": -1, "top_p": 1,
                    "repetition_penalty": 1.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                results.append(await one_request(host, port, "/v1/chat/completions", body, headers))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

    t_start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(conc)])
    wall = time.perf_counter() - t_start
    ttft = [s[0] - t0 for t0, s, _ in results if s]
    itl = [b - a for _, s, _ in results for a, b in zip(s, s[1:])]
    gen = sum((u or {}).get("completion_tokens", len(s)) for _, s, u in results)
    # Decode throughput: generated tokens over the span in which tokens were being produced.
    firsts = [s[0] for _, s, _ in results if s]
    lasts = [s[-1] for _, s, _ in results if s]
    span = (max(lasts) - min(firsts)) if firsts else float("nan")
    itl_mean = statistics.fmean(itl) if itl else float("nan")
    return {"concurrency": conc, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "gen_tokens": gen, "tok_s": gen / wall if wall > 0 else 0.0,
            "out_tok_s": (gen - len(results)) / span if span and span > 0 else float("nan"),
            "decode_tok_s": conc / itl_mean if itl_mean > 0 else float("nan"),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "first_error": errors[0] if errors else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default: 2 x concurrency, at least 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    ap.add_argument("--image", default=None, help="PNG/JPEG file sent with every request")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.model is None:
        import urllib.request
        req = urllib.request.Request(args.url + "/v1/models",
                                     headers={"Authorization": "Bearer " + args.api_key} if args.api_key else {})
        args.model = json.loads(urllib.request.urlopen(req).read())["data"][0]["id"]
    image_url = None
    if args.image:
        mime = "image/png" if args.image.endswith(".png") else "image/jpeg"
        image_url = "data:%s;base64,%s" % (mime, base64.b64encode(open(args.image, "rb").read()).decode())
    rows = []
    print("model=%s max_tokens=%d image=%s" % (args.model, args.max_tokens, args.image or "none"))
    print("%5s %5s %4s %8s %12s %8s %10s %8s %10s %10s %10s %10s" % (
        "conc", "reqs", "err", "wall_s", "decode_tok/s", "speedup", "out_tok/s", "speedup", "ttft_p50", "ttft_p99",
        "itl_p50", "itl_p99"))
    base = None
    for level, c in enumerate(int(x) for x in args.concurrency.split(",")):
        n = args.requests or max(4, 2 * c)
        r = asyncio.run(run_level(args, level, c, n, image_url))
        if base is None:
            base = r
        r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"] if base["decode_tok_s"] else float("nan")
        r["out_speedup"] = r["out_tok_s"] / base["out_tok_s"] if base["out_tok_s"] else float("nan")
        rows.append(r)
        print("%5d %5d %4d %8.2f %12.2f %7.2fx %10.2f %7.2fx %9.1fms %9.1fms %9.1fms %9.1fms" % (
            c, r["requests"], r["errors"], r["wall_s"], r["decode_tok_s"], r["speedup"], r["out_tok_s"],
            r["out_speedup"], r["ttft_p50"] * 1e3, r["ttft_p99"] * 1e3, r["itl_p50"] * 1e3, r["itl_p99"] * 1e3))
        if r["first_error"]:
            print("   first error: %s" % r["first_error"][:200], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
