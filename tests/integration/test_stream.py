"""test_stream.py — SSE streaming as OpenAI sends it: role in the first delta, text deltas that
concatenate to the non-streaming answer, finish_reason in the last content chunk, the usage chunk
with empty choices when asked, `data: [DONE]`, and pings while waiting (raw bytes via curl)."""
import json
import subprocess

from conftest import GREEDY, MODEL, case_messages, fixture_case, image_part


def test_stream_matches_non_stream_with_image(client, tokenizer):
    case = fixture_case("image")
    kw = dict(model=MODEL, messages=case_messages(case), max_tokens=32, extra_body=dict(GREEDY, ignore_eos=True))
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == whole.choices[0].message.content == tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens == case["n_prompt"]
    assert usage.usage.completion_tokens == 32
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stream_raw_sse_with_curl(server):
    body = {"model": MODEL, "stream": True, "max_tokens": 6, "messages": [
        {"role": "user", "content": [image_part("odd_150x97.png"), {"type": "text", "text": "hi"}]}]}
    out = subprocess.run(["curl", "-sS", "-N", "-H", "Content-Type: application/json", "--data-binary", "@-",
                          "-D", "-", server.url + "/v1/chat/completions"],
                         input=json.dumps(body).encode(), capture_output=True, check=True).stdout.decode()
    head, _, sse = out.partition("\r\n\r\n")
    assert "text/event-stream" in head.lower()
    events = [e for e in sse.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    datas = [json.loads(e[6:]) for e in events[:-1] if e.startswith("data: ")]
    assert datas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert datas[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    for e in events[:-1]:
        assert e.startswith("data: ") or e.startswith(": ping")


def test_stream_stop_string_never_leaks(client, tokenizer):
    case = fixture_case("text")
    full = tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
    stop = full[10:14]
    chunks = list(client.chat.completions.create(model=MODEL, messages=case_messages(case), max_tokens=32,
                                                 stop=stop, stream=True, extra_body=dict(GREEDY, ignore_eos=True)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_n2_indices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], n=2,
                                                 max_tokens=4, stream=True, temperature=0))
    idx = {c.choices[0].index for c in chunks if c.choices}
    assert idx == {0, 1}
    fin = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(f.index for f in fin) == [0, 1]


def test_stream_utf8_boundaries(client):
    """Every delta is valid UTF-8 on its own (the client would fail to decode JSON otherwise) and
    the concatenation equals the non-streaming text, for a long sampled generation."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "多语言 текст ✓"}], max_tokens=48, temperature=1.0,
              seed=123, extra_body={"top_k": -1, "top_p": 1.0, "ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices)
    assert text == whole


def _metric(server, name):
    st, _, text = server.request("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name + " missing")


def _wait_cancelled(server, rid, budget_s=5.0):
    import time
    t0 = time.time()
    while time.time() - t0 < budget_s:
        lines = [l for l in server.log if "event=request id=%s " % rid in l]
        if lines and _metric(server, "vlmd_running_sequences") == 0:
            return lines[0], time.time() - t0
        time.sleep(0.02)
    raise AssertionError("request %s was not cancelled within %.1f s:\n%s" % (rid, budget_s, server.log_text()[-2000:]))


def test_disconnect_cancels_stream(server):
    import http.client
    import re
    ctx = int(server.request("GET", "/v1/models")[2]["data"][0]["max_model_len"])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": ctx - 64, "stream": True,
            "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "X-Request-Id": "disc-stream-1"})
    resp = conn.getresponse()
    got = b""
    while got.count(b"data: ") < 3:  # role chunk + two tokens
        got += resp.read1(4096)
    conn.sock.close()
    conn.close()
    line, _ = _wait_cancelled(server, "disc-stream-1")
    n = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert n < ctx - 64


def test_disconnect_cancels_non_stream(server):
    import re
    import socket
    import time
    ctx = int(server.request("GET", "/v1/models")[2]["data"][0]["max_model_len"])
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": ctx - 64,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Request-Id: disc-plain-1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    for _ in range(500):  # wait until it generates
        if _metric(server, "vlmd_running_sequences") >= 1:
            break
        time.sleep(0.01)
    time.sleep(0.2)
    s.close()
    line, _ = _wait_cancelled(server, "disc-plain-1")
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < ctx - 64
    assert "status=499" in line
