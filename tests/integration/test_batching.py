"""test_batching.py — batching invariance: 16 concurrent greedy requests with different prompts
and images return exactly the tokens each returns when run alone (continuous batching, chunked
prefill and paging must not change any sequence's result). Tokens are compared as logprob token
lists plus text, so a difference in any token fails."""
import concurrent.futures as cf

from conftest import GREEDY, MODEL, image_part

IMGS = ["grad_112.png", "grad_224.png", "odd_150x97.png", "photo_112x84.jpg", "rgba_64x48.png", "tiny_40x30.png",
        "wide_200x60.png", None]


def request(i):
    img = IMGS[i % len(IMGS)]
    text = "Request %d: %s" % (i, "describe " * (1 + i % 5))
    content = [{"type": "text", "text": text}] if img is None else [image_part(img), {"type": "text", "text": text}]
    return dict(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12 + i % 7, logprobs=True,
                extra_body=dict(GREEDY, ignore_eos=True))


def run(client, i):
    r = client.chat.completions.create(**request(i))
    return r.choices[0].message.content, [t.token for t in r.choices[0].logprobs.content], r.usage.prompt_tokens


def test_sixteen_concurrent_equal_alone(client):
    alone = [run(client, i) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda i: run(client, i), range(16)))
    for i in range(16):
        assert together[i] == alone[i], "request %d differs when batched" % i
    assert len({a[0] for a in alone}) > 1  # the prompts really differ


def test_preemption_keeps_results(client):
    """With a KV pool too small for all 16 at once (--kv-memory 256K holds a few hundred tokens of
    the tiny model), the engine must preempt and resume sequences; every result still equals the
    request run alone on the roomy session server."""
    import openai
    from conftest import start_server
    alone = [run(client, i) for i in range(16)]
    srv = start_server("--max-seqs", "16", "--kv-memory", "256K", "--max-queue", "64")
    try:
        small = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        with cf.ThreadPoolExecutor(16) as ex:
            together = list(ex.map(lambda i: run(small, i), range(16)))
        for i in range(16):
            assert together[i] == alone[i], "request %d differs under KV pressure" % i
        st, _, text = srv.request("GET", "/metrics")
        pre = [l for l in text.splitlines() if l.startswith("vlmd_preemptions_total ")]
        assert float(pre[0].split()[1]) > 0, "the pool was not small enough to force a preemption"
    finally:
        assert srv.stop() == 0
