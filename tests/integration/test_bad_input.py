"""test_bad_input.py — a table of malformed and hostile requests. Each must get the right HTTP
status and an OpenAI error object {"error": {"message", "type", "param", "code"}}, and while the
table runs another client keeps getting normal answers (the daemon never stops serving)."""
import base64
import json
import socket
import struct
import threading
import time
import zlib

import pytest

from conftest import IMAGES, MODEL, data_url, image_part, start_server

TINY_PNG = data_url(IMAGES / "tiny_40x30.png")


def one_pixel_png():
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


PX_URL = "data:image/png;base64," + base64.b64encode(one_pixel_png()).decode()


def png_bomb(w=20000, h=20000):
    """A valid PNG header for a w x h 8-bit gray image whose zero rows compress ~1000:1."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    co = zlib.compressobj(9)
    row = b"\x00" * (w + 1)
    data = b"".join(co.compress(row) for _ in range(h)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", data) + chunk(b"IEND", b""))


def user(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def chat(**kw):
    b = user("hello")
    b.update(kw)
    return b


def deep(n):
    return "[" * n + "]" * n


BOMB_URL = "data:image/png;base64," + base64.b64encode(png_bomb()).decode()

# (name, method, path, body: dict | bytes | str, expected status, expected param or None)
CASES = [
    ("broken_json", "POST", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("empty_body", "POST", "/v1/chat/completions", b"", 400, None),
    ("trailing_garbage", "POST", "/v1/chat/completions", json.dumps(chat()).encode() + b" xyz", 400, None),
    ("not_an_object", "POST", "/v1/chat/completions", b"[1, 2, 3]", 400, None),
    ("deep_nesting", "POST", "/v1/chat/completions", deep(100000).encode(), 400, None),
    ("deep_nesting_in_field", "POST", "/v1/chat/completions",
     ('{"messages": ' + deep(5000) + '}').encode(), 400, None),
    ("huge_number", "POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"x"}],"max_tokens":1e400}', 400, "max_tokens"),
    ("nan_literal", "POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"x"}],"temperature":NaN}', 400, None),
    ("infinity_literal", "POST", "/v1/chat/completions", b'{"messages":[],"top_p":Infinity}', 400, None),
    ("invalid_utf8", "POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff\xfe"}]}', 400, None),
    ("overlong_utf8", "POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xc0\xaf"}]}', 400, None),
    ("max_tokens_string", "POST", "/v1/chat/completions", chat(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens_negative", "POST", "/v1/chat/completions", chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens_zero", "POST", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens_fraction", "POST", "/v1/chat/completions", chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens_over_limit", "POST", "/v1/chat/completions", chat(max_tokens=10**9), 400, "max_tokens"),
    ("max_completion_tokens_bad", "POST", "/v1/chat/completions", chat(max_completion_tokens=-1), 400, "max_completion_tokens"),
    ("temperature_negative", "POST", "/v1/chat/completions", chat(temperature=-1), 400, "temperature"),
    ("temperature_huge", "POST", "/v1/chat/completions", chat(temperature=5), 400, "temperature"),
    ("temperature_string", "POST", "/v1/chat/completions", chat(temperature="hot"), 400, "temperature"),
    ("top_p_zero", "POST", "/v1/chat/completions", chat(top_p=0), 400, "top_p"),
    ("top_p_above_one", "POST", "/v1/chat/completions", chat(top_p=1.5), 400, "top_p"),
    ("top_k_negative", "POST", "/v1/chat/completions", chat(top_k=-5), 400, "top_k"),
    ("min_p_above_one", "POST", "/v1/chat/completions", chat(min_p=2), 400, "min_p"),
    ("presence_penalty_range", "POST", "/v1/chat/completions", chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty_type", "POST", "/v1/chat/completions", chat(frequency_penalty=[1]), 400, "frequency_penalty"),
    ("repetition_penalty_zero", "POST", "/v1/chat/completions", chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("seed_fraction", "POST", "/v1/chat/completions", chat(seed=1.5), 400, "seed"),
    ("n_zero", "POST", "/v1/chat/completions", chat(n=0), 400, "n"),
    ("n_huge", "POST", "/v1/chat/completions", chat(n=1000), 400, "n"),
    ("stop_number", "POST", "/v1/chat/completions", chat(stop=123), 400, "stop"),
    ("stop_empty_string", "POST", "/v1/chat/completions", chat(stop=[""]), 400, "stop"),
    ("stop_too_many", "POST", "/v1/chat/completions", chat(stop=["a%d" % i for i in range(100)]), 400, "stop"),
    ("logprobs_string", "POST", "/v1/chat/completions", chat(logprobs="yes"), 400, "logprobs"),
    ("top_logprobs_too_many", "POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs_without_logprobs", "POST", "/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs"),
    ("stream_string", "POST", "/v1/chat/completions", chat(stream="true"), 400, "stream"),
    ("stream_options_without_stream", "POST", "/v1/chat/completions", chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("user_not_string", "POST", "/v1/chat/completions", chat(user=5), 400, "user"),
    ("tools_unsupported", "POST", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools"),
    ("missing_messages", "POST", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("messages_string", "POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("messages_empty", "POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("message_not_object", "POST", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("unknown_role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("missing_role", "POST", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("content_number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("part_unknown_type", "POST", "/v1/chat/completions", user([{"type": "audio", "audio": "x"}]), 400, "messages[0].content[0].type"),
    ("text_part_without_text", "POST", "/v1/chat/completions", user([{"type": "text"}]), 400, "messages[0].content[0].text"),
    ("image_url_not_object", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": 5}]), 400, "messages[0].content[0].image_url"),
    ("bad_base64", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@not base64"}}]), 400, "messages[0].content[0].image_url.url"),
    ("not_an_image", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello, this is text" * 10).decode()}}]), 400, "messages[0].content[0].image_url.url"),
    ("truncated_png", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode((IMAGES / "grad_112.png").read_bytes()[:200]).decode()}}]), 400, "messages[0].content[0].image_url.url"),
    ("decompression_bomb_png", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": BOMB_URL}}]), 400, "messages[0].content[0].image_url.url"),
    ("remote_url_disabled", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]), 400, "messages[0].content[0].image_url.url"),
    ("local_file_url", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400, "messages[0].content[0].image_url.url"),
    ("ten_thousand_images", "POST", "/v1/chat/completions", user([{"type": "image_url", "image_url": {"url": PX_URL}}] * 10000), 400, None),
    ("detail_bad", "POST", "/v1/chat/completions", user([image_part("tiny_40x30.png", detail="ultra")]), 400, "messages[0].content[0].image_url.detail"),
    ("min_pixels_over_max", "POST", "/v1/chat/completions", user([image_part("tiny_40x30.png", min_pixels=100000, max_pixels=5000)]), 400, None),
    ("image_in_assistant", "POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": [image_part("tiny_40x30.png")]}]}, 400, None),
    ("unknown_model", "POST", "/v1/chat/completions", dict(chat(), model="gpt-17"), 404, "model"),
    ("wrong_method", "GET", "/v1/chat/completions", None, 405, None),
    ("wrong_method_models", "POST", "/v1/models", {}, 405, None),
    ("unknown_path", "GET", "/v2/everything", None, 404, None),
    ("model_not_found_get", "GET", "/v1/models/nope", None, 404, "model"),
    ("completions_missing_prompt", "POST", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("completions_prompt_number", "POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("completions_token_out_of_range", "POST", "/v1/completions", {"prompt": [1, 999999999]}, 400, "prompt"),
    ("completions_token_huge", "POST", "/v1/completions", b'{"prompt": [1e20, 5]}', 400, "prompt"),
    ("completions_token_negative", "POST", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("completions_prompt_batch", "POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions_suffix_with_ids", "POST", "/v1/completions", {"prompt": [1, 2], "suffix": "x"}, 400, "suffix"),
    ("completions_echo_logprobs", "POST", "/v1/completions", {"prompt": "a", "echo": True, "logprobs": 1}, 400, "echo"),
    ("completions_logprobs_bool", "POST", "/v1/completions", {"prompt": "a", "logprobs": True}, 400, "logprobs"),
    ("completions_empty_ids", "POST", "/v1/completions", {"prompt": []}, 400, "prompt"),
]


@pytest.fixture(scope="module")
def background(server):
    """Another client doing normal requests for as long as the table runs."""
    stop = threading.Event()
    results = []

    def loop():
        while not stop.is_set():
            st, _, body = server.request("POST", "/v1/chat/completions", chat(max_tokens=2), timeout=60)
            results.append(st)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield results
    stop.set()
    t.join(60)
    assert len(results) >= 3 and all(s == 200 for s in results), results


def check_error(status, body, want_status, want_param):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert isinstance(e["message"], str) and e["message"]
    assert isinstance(e["type"], str) and isinstance(e["code"], str)
    if want_param is not None:
        assert e["param"] == want_param, e


@pytest.mark.parametrize("name,method,path,body,want,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, background, name, method, path, body, want, param):
    raw = body if isinstance(body, bytes) else None
    st, hdrs, resp = server.request(method, path, None if raw is not None else body, raw=raw)
    check_error(st, resp, want, param)
    if want == 405:
        assert "Allow" in hdrs


def test_prompt_longer_than_context(server, background):
    st, _, models = server.request("GET", "/v1/models")
    ctx = int(models["data"][0]["max_model_len"])
    st, _, body = server.request("POST", "/v1/completions", {"prompt": [9707] * (ctx + 1), "max_tokens": 1})
    check_error(st, body, 400, None)
    st, _, body = server.request("POST", "/v1/completions", {"prompt": [9707] * 8, "max_tokens": ctx})
    check_error(st, body, 400, "prompt")
    assert body["error"]["code"] == "context_length_exceeded"


def raw_http(server, data, timeout=30, per_byte_delay=None):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        if per_byte_delay is None:
            s.sendall(data)
        else:
            for i in range(len(data)):
                try:
                    s.sendall(data[i:i + 1])
                except OSError:
                    break
                time.sleep(per_byte_delay)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def parse_raw(out):
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body.decode())


def test_body_20mb_is_413_before_upload(server, background):
    big = b"x" * (20 << 20)
    hdr = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(big)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(hdr)
    out = s.recv(65536)  # answered from the headers alone, nothing of the body sent
    s.close()
    st, body = parse_raw(out)
    check_error(st, body, 413, None)


def test_chunked_body_over_limit_is_413(server, background):
    hdr = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(hdr)
    piece = b"x" * (1 << 20)
    out = b""
    try:
        for _ in range(20):
            s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
            out += c
    except OSError:
        pass
    s.close()
    st, body = parse_raw(out)
    check_error(st, body, 413, None)


def test_slow_client_one_byte_per_second(server, background):
    body = json.dumps(chat()).encode()
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(req)
    t0 = time.time()
    out = b""
    s.settimeout(1.0)
    for i in range(len(body)):
        try:
            s.sendall(body[i:i + 1])
        except OSError:
            break
        try:
            c = s.recv(65536)
            if c:
                out += c
                break
        except socket.timeout:
            pass
        if time.time() - t0 > 20:
            break
    s.settimeout(5)
    try:
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            c = s.recv(65536)
            if not c:
                break
            out += c
    except OSError:
        pass
    s.close()
    st, resp = parse_raw(out)
    check_error(st, resp, 408, None)
    assert time.time() - t0 < 10  # --read-timeout 3 in the test server


def test_auth_required():
    srv = start_server("--max-seqs", "2", env={"VLMD_API_KEY": "sekret"})
    try:
        for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekret"}):
            st, h, body = srv.request("POST", "/v1/chat/completions", chat(), headers=hdr)
            check_error(st, body, 401, None)
        st, _, body = srv.request("GET", "/v1/models")
        check_error(st, body, 401, None)
        st, _, body = srv.request("POST", "/v1/chat/completions", chat(), headers={"Authorization": "Bearer sekret"})
        assert st == 200, body
        assert srv.request("GET", "/health")[0] == 200  # probes stay open
    finally:
        assert srv.stop() == 0


def test_queue_full_is_429_with_retry_after():
    srv = start_server("--max-seqs", "1", "--max-queue", "1")
    try:
        results = []

        def one():
            results.append(srv.request("POST", "/v1/chat/completions",
                                       chat(max_tokens=24, ignore_eos=True), timeout=120))

        ts = [threading.Thread(target=one) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        codes = sorted(r[0] for r in results)
        assert 200 in codes and 429 in codes, codes
        for st, hdrs, body in results:
            if st == 429:
                check_error(st, body, 429, None)
                assert hdrs.get("Retry-After") == "1"
    finally:
        assert srv.stop() == 0
