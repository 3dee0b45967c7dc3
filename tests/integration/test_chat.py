"""test_chat.py — /v1/chat/completions (non-streaming) with the official openai client and curl,
checked against the Hugging Face fixtures: exact greedy tokens and prompt token counts (image
tokens included), plus models/health/ready/metrics and the request id echo."""
import json
import subprocess

import pytest

from conftest import GREEDY, IMAGES, MODEL, case_messages, data_url, fixture_case, image_part, start_server


@pytest.mark.parametrize("case_name", ["text", "image", "two_images", "multiturn"])
def test_greedy_matches_reference(client, tokenizer, case_name):
    case = fixture_case(case_name)
    r = client.chat.completions.create(model=MODEL, messages=case_messages(case), max_tokens=32,
                                       extra_body=dict(GREEDY, ignore_eos=True), **{})
    assert r.usage.prompt_tokens == case["n_prompt"]
    assert r.usage.completion_tokens == 32
    assert r.usage.total_tokens == case["n_prompt"] + 32
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL


def test_models_health_ready(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    st, _, body = server.request("GET", "/v1/models/" + MODEL)
    assert st == 200 and body["id"] == MODEL
    assert server.request("GET", "/health")[0] == 200
    st, _, body = server.request("GET", "/ready")
    assert st == 200 and body["status"] == "ready"


def test_metrics_after_traffic(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    st, hdrs, text = server.request("GET", "/metrics")
    assert st == 200 and hdrs["Content-Type"].startswith("text/plain")
    for name in ["vlmd_requests_total{code=\"200\"}", "vlmd_queue_depth", "vlmd_running_sequences",
                 "vlmd_waiting_sequences", "vlmd_kv_cache_usage", "vlmd_generation_tokens_per_second",
                 "vlmd_time_to_first_token_seconds_bucket", "vlmd_inter_token_latency_seconds_count",
                 "vlmd_generation_tokens_total"]:
        assert name in text, name
    gen = [l for l in text.splitlines() if l.startswith("vlmd_generation_tokens_total ")]
    assert int(gen[0].split()[1]) >= 4


def test_request_id_echo_and_access_log(server):
    st, hdrs, body = server.request("POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                                    headers={"X-Request-Id": "trace-abc-123"})
    assert st == 200 and hdrs["X-Request-Id"] == "trace-abc-123"
    import time
    for _ in range(50):
        if "id=trace-abc-123 method=POST path=/v1/chat/completions status=200" in server.log_text():
            break
        time.sleep(0.05)
    line = [l for l in server.log if "event=request id=trace-abc-123" in l][0]
    assert "completion_tokens=2" in line and "prompt_tokens=" in line and "total_ms=" in line


def test_curl_chat_with_image(server):
    body = {"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "user", "content": [image_part("grad_112.png"), {"type": "text", "text": "What is it?"}]}]}
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                          "--data-binary", "@-", server.url + "/v1/chat/completions"],
                         input=json.dumps(body).encode(), capture_output=True, check=True).stdout.decode()
    text, code = out.rsplit("\n", 1)
    assert code == "200"
    r = json.loads(text)
    assert r["usage"]["completion_tokens"] <= 5
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


def test_image_pixel_budget_changes_prompt_tokens(client):
    """detail=low and max_pixels shrink the image's token count; usage reflects it."""
    def tokens(**kw):
        msgs = [{"role": "user", "content": [image_part("grad_224.png", **kw), {"type": "text", "text": "x"}]}]
        return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1).usage.prompt_tokens
    full = tokens()
    small = tokens(max_pixels=112 * 112)
    assert full - small == 64 - 16  # 224x224 -> 8x8 merged tokens; 112x112 -> 4x4


def test_n_choices_and_seed(client):
    msgs = [{"role": "user", "content": "Tell me something."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, n=3, max_tokens=8, temperature=1.0, seed=7,
                                       extra_body={"top_k": -1, "top_p": 1.0})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 24
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, n=3, max_tokens=8, temperature=1.0, seed=7,
                                        extra_body={"top_k": -1, "top_p": 1.0})
    assert [c.message.content for c in r.choices] == [c.message.content for c in r2.choices]


def test_logprobs(client):
    msgs = [{"role": "user", "content": "Count."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, logprobs=True, top_logprobs=3,
                                       extra_body=dict(GREEDY, ignore_eos=True))
    lp = r.choices[0].logprobs.content
    assert len(lp) == 6
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.bytes == list(e.token.encode())
        # greedy: the chosen token is the most likely one
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4
    # Token strings concatenate to the text unless a token holds part of a UTF-8 character
    # (then, as with OpenAI, its string shows U+FFFD and only its bytes are exact).
    if not any("\ufffd" in e.token for e in lp):
        assert "".join(e.token for e in lp) == r.choices[0].message.content


def test_stop_string(client, tokenizer):
    case = fixture_case("text")
    full = tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
    # a stop string that occurs in the middle of the reference greedy text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.chat.completions.create(model=MODEL, messages=case_messages(case), max_tokens=32, stop=[stop],
                                       extra_body=dict(GREEDY, ignore_eos=True))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.usage.completion_tokens < 32


def _metric(server, name):
    st, _, text = server.request("GET", "/metrics")
    return int(float([l for l in text.splitlines() if l.startswith(name + " ")][0].split()[1]))


def test_prefix_cache_reuse(server, client, tokenizer):
    """Automatic prefix cache: the same image prompt again reads every prompt token but its last
    from the cache (the full 16-token pages, then the start of the page the first answer filled),
    says so in usage.prompt_tokens_details and /metrics, and still gives the reference's greedy
    tokens. Its image comes from the image cache (no vision encoder run)."""
    case = fixture_case("image")
    kw = dict(model=MODEL, messages=case_messages(case), max_tokens=32, extra_body=dict(GREEDY, ignore_eos=True))
    want = tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
    a = client.chat.completions.create(**kw)
    hits0 = _metric(server, "vlmd_prefix_cache_hits_total")
    img0 = _metric(server, "vlmd_image_cache_hits_total")
    miss0 = _metric(server, "vlmd_image_cache_misses_total")
    b = client.chat.completions.create(**kw)
    full = case["n_prompt"] - 1
    assert b.usage.prompt_tokens == case["n_prompt"] and b.usage.prompt_tokens_details.cached_tokens == full
    assert a.choices[0].message.content == b.choices[0].message.content == want
    assert _metric(server, "vlmd_prefix_cache_hits_total") - hits0 == full
    assert _metric(server, "vlmd_image_cache_hits_total") - img0 == 1
    assert _metric(server, "vlmd_image_cache_misses_total") == miss0
    assert _metric(server, "vlmd_image_cache_bytes") > 0
    assert _metric(server, "vlmd_prefix_cache_queries_total") >= 2 * case["n_prompt"]


def test_prefix_cache_off():
    srv = start_server("--no-prefix-cache", "--image-cache-memory", "0")
    try:
        case = fixture_case("image")
        out = []
        for _ in range(2):
            st, _, body = srv.chat(case_messages(case), max_tokens=8, ignore_eos=True, **GREEDY)
            assert st == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            out.append(body["choices"][0]["message"]["content"])
        assert out[0] == out[1]
        assert _metric(srv, "vlmd_prefix_cache_hits_total") == 0
        assert _metric(srv, "vlmd_image_cache_hits_total") == 0 and _metric(srv, "vlmd_image_cache_bytes") == 0
        assert "prefix cache off" in srv.log_text()
    finally:
        assert srv.stop() == 0
