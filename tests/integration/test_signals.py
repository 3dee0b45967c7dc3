"""test_signals.py — SIGTERM drains: /ready turns 503 at once, new generation requests get 503,
a stream that was running finishes completely, and the process exits 0."""
import json
import signal
import threading
import time

from conftest import MODEL, start_server


def test_sigterm_drains_running_stream():
    srv = start_server("--max-seqs", "4", "--drain-timeout", "60")
    import urllib.request
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    got = {}

    def consume():
        with urllib.request.urlopen(req, timeout=120) as r:
            got["data"] = r.read().decode()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)  # the stream is running
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    if srv.proc.poll() is None:
        st, _, b = srv.request("GET", "/ready", timeout=5)
        assert st == 503 and b["status"] == "draining"
        st, hdrs, b = srv.request("POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, timeout=5)
        assert st == 503 and b["error"]["code"] == "unavailable"
    t.join(120)
    assert srv.proc.wait(60) == 0
    events = [e for e in got["data"].split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"
    n_text = sum(1 for e in events[1:-1] if json.loads(e[6:])["choices"][0]["delta"].get("content"))
    assert n_text >= 1
    assert "event=drain" in srv.log_text() and "event=exit code=0" in srv.log_text()


def test_drain_timeout_cancels_and_exits_zero():
    srv = start_server("--max-seqs", "2", "--drain-timeout", "0.5")
    import urllib.request
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "ignore_eos": True}
    req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    got = {}

    def consume():
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                got["body"] = json.loads(r.read())
        except Exception as e:  # noqa: BLE001 - any answer is fine, only the exit matters
            got["err"] = e

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    t.join(30)
    if "body" in got:
        assert got["body"]["choices"][0]["finish_reason"] == "length"
