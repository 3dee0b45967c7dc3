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
