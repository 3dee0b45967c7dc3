"""test_signals.py — SIGTERM drains: /ready turns 503 at once, new generation requests get 503,
a stream that was running finishes completely, and the process exits 0; with a short
--drain-timeout the running request is cut and the process still exits 0."""
import http.client
import json
import signal
import threading
import time

from conftest import MODEL, start_server


def open_stream(srv, max_tokens):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def read_events(resp, first_content):
    """Reads SSE events until [DONE]; sets first_content once a content delta arrived."""
    buf, events = b"", []
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            return events
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            ev = ev.decode()
            events.append(ev)
            if ev.startswith("data: {") and '"content":"' in ev and '"role"' not in ev:
                first_content.set()
            if ev == "data: [DONE]":
                return events


def test_sigterm_drains_running_stream():
    srv = start_server("--max-seqs", "4", "--drain-timeout", "120")
    try:
        _sigterm_drains(srv)
    finally:
        srv.stop(signal.SIGKILL)


def _sigterm_drains(srv):
    conn, resp = open_stream(srv, 300)
    first = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("events", read_events(resp, first)))
    t.start()
    assert first.wait(60), "no token arrived"
    srv.proc.send_signal(signal.SIGTERM)
    for _ in range(100):  # the drain state shows within a moment
        st, _, b = srv.request("GET", "/ready", timeout=5)
        if st == 503:
            break
        time.sleep(0.01)
    assert st == 503 and b["status"] == "draining"
    st, hdrs, b = srv.request("POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, timeout=5)
    assert st == 503 and b["error"]["code"] == "unavailable"
    assert srv.request("GET", "/health", timeout=5)[0] == 200
    t.join(120)
    assert srv.proc.wait(120) == 0
    events = [e for e in out["events"] if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert len(text) > 0
    log = srv.log_text()
    assert "event=drain" in log and "event=exit code=0" in log
    assert "completion_tokens=300" in log  # the running request ran to its end
    conn.close()


def test_drain_timeout_cancels_and_exits_zero():
    srv = start_server("--max-seqs", "2", "--drain-timeout", "0.3")
    try:
        _drain_timeout(srv)
    finally:
        srv.stop(signal.SIGKILL)


def _drain_timeout(srv):
    ctx = int(srv.request("GET", "/v1/models")[2]["data"][0]["max_model_len"])
    conn, resp = open_stream(srv, ctx - 64)  # far more than can finish in the drain window
    first = threading.Event()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("events", read_events(resp, first)))
    t.start()
    assert first.wait(60)
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert time.time() - t0 < 10
    t.join(30)
    events = [e for e in out.get("events", []) if e.startswith("data: ")]
    if events:  # the stream was closed properly: last chunk says why
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "event=drain_timeout" in srv.log_text()
    conn.close()
