"""test_deploy_lb.py — three `vlmd serve` replicas behind the shipped load-balancer configs
(deploy/nginx/vlmd.conf, deploy/haproxy/vlmd.cfg, rendered by deploy/render.py), all on 127.0.0.1.

A bounded load of mixed streaming / non-streaming chat requests with images goes through the
balancer; in the middle one replica gets SIGTERM while a stream runs on it. Asserted: no client
sees an error, every answer is complete (all max_tokens generated, streams end with [DONE]) --
including the streams running on the draining replica --, requests started after its listener closed (end of the drain delay)
go to the other replicas, the drained replica exits 0 within its drain timeout, and once restarted
on the same port it is back in rotation (it gets requests again). Which replica served a request
is read from the replicas' logs: vlmd keeps the client's X-Request-Id and logs it.

Skipped only when the nginx / haproxy binary is missing (tools/install-deps.sh installs both).
"""
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import MODEL, ROOT, data_url, IMAGES, start_server

sys.path.insert(0, str(ROOT / "deploy"))
import render  # noqa: E402  (deploy/render.py: the same code a user runs)

N_REPLICAS = 3
N_REQUESTS = 40          # the bounded load
N_WORKERS = 6            # concurrent clients
SIGTERM_AFTER = 10       # completed requests before the SIGTERM
DRAIN_DELAY_S = 1.5      # vlmd --drain-delay: longer than HAProxy's check interval (1 s)
DRAIN_TIMEOUT_S = 60     # vlmd --drain-timeout: generous, a drain ends as soon as its streams do
ROUTE_MARGIN_S = 0.2     # once its listener closed (+ this), no new request may reach the draining replica
REJOIN_TIMEOUT_S = 12    # nginx's fail_timeout (5 s) + probes; HAProxy needs one check (1 s)
IMAGE_NAMES = ["tiny_40x30.png", "rgba_64x48.png", "grad_112.png", "photo_112x84.jpg"]
STREAM_TOKENS = 128      # long enough that streams are running when the SIGTERM comes
PLAIN_TOKENS = 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_flags():
    return ("--threads", "1", "--max-seqs", "8", "--drain-delay", str(DRAIN_DELAY_S),
            "--drain-timeout", str(DRAIN_TIMEOUT_S))


# ---- load balancers -----------------------------------------------------------------------------

class Balancer:
    def __init__(self, kind, replicas, tmp):
        self.kind, self.tmp = kind, pathlib.Path(tmp)
        self.port = free_port()
        addrs = ["127.0.0.1:%d" % r.port for r in replicas]
        listen = "127.0.0.1:%d" % self.port
        self.logf = open(self.tmp / ("%s.log" % kind), "w+")
        if kind == "nginx":
            conf = render.render((ROOT / "deploy/nginx/vlmd.conf").read_text(), addrs, listen)
            (self.tmp / "vlmd.conf").write_text(conf)
            tmpd = self.tmp / "tmp"
            tmpd.mkdir()
            os.chmod(tmpd, 0o777)  # run as root, nginx's workers are "nobody"
            # The shipped file is an http-context include (conf.d); this is the minimal main file.
            main = ("daemon off;\nworker_processes 1;\npid %(t)s/nginx.pid;\nerror_log %(t)s/error.log warn;\n"
                    "events { worker_connections 1024; }\n"
                    "http {\n access_log off;\n client_body_temp_path %(d)s;\n proxy_temp_path %(d)s;\n"
                    " fastcgi_temp_path %(d)s;\n uwsgi_temp_path %(d)s;\n scgi_temp_path %(d)s;\n"
                    " include %(t)s/vlmd.conf;\n}\n") % {"t": self.tmp, "d": tmpd}
            (self.tmp / "main.conf").write_text(main)
            cmd = ["nginx", "-c", str(self.tmp / "main.conf"), "-p", str(self.tmp)]
        else:
            conf = render.render((ROOT / "deploy/haproxy/vlmd.cfg").read_text(), addrs, listen)
            (self.tmp / "vlmd.cfg").write_text(conf)
            cmd = ["haproxy", "-db", "-f", str(self.tmp / "vlmd.cfg")]
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while time.time() < deadline:
            assert self.proc.poll() is None, "%s exited:\n%s" % (kind, self.log())
            try:
                st, _ = get(self.port, "/v1/models")
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("%s never answered:\n%s" % (kind, self.log()))

    def log(self):
        self.logf.flush()
        self.logf.seek(0)
        text = self.logf.read()
        err = self.tmp / "error.log"
        return text + (err.read_text() if err.exists() else "")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ---- client -------------------------------------------------------------------------------------

def chat(port, rid, stream, image, max_tokens, headers=None):
    """One chat request through the balancer; returns a dict describing how it went."""
    body = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES / image)}},
                                                      {"type": "text", "text": "describe %s" % rid}]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    h = {"Content-Type": "application/json", "X-Request-Id": rid}
    h.update(headers or {})
    res = {"rid": rid, "stream": stream, "max_tokens": max_tokens, "t0": time.time(), "ok": False,
           "first_token": None}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body), h)
        r = c.getresponse()
        res["status"] = r.status
        if r.status != 200:
            res["error"] = r.read().decode(errors="replace")[:300]
            return res
        if not stream:
            j = json.loads(r.read())
            res["ok"] = j["usage"]["completion_tokens"] == max_tokens and j["choices"][0]["finish_reason"] == "length"
            res["why"] = None if res["ok"] else "incomplete: %s" % json.dumps(j["usage"])
            return res
        buf, events = b"", []
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                events.append(ev.decode())
                if res["first_token"] is None and '"content":"' in events[-1] and '"role"' not in events[-1]:
                    res["first_token"] = time.time()
            if events and events[-1] == "data: [DONE]":
                break
        datas = [e[6:] for e in events if e.startswith("data: ")]
        if not datas or datas[-1] != "[DONE]":
            res["why"] = "stream ended without [DONE]"
            return res
        objs = [json.loads(d) for d in datas[:-1]]
        errs = [o for o in objs if "error" in o]
        usage = objs[-1].get("usage") if objs else None
        fins = [o["choices"][0]["finish_reason"] for o in objs if o.get("choices")]
        res["ok"] = not errs and usage is not None and usage["completion_tokens"] == max_tokens \
            and fins and fins[-1] == "length"
        res["why"] = None if res["ok"] else "incomplete stream: errors=%s usage=%s" % (errs, usage)
        return res
    except Exception as e:  # a reset, a timeout: exactly what must not happen
        res["status"] = None
        res["error"] = repr(e)
        return res
    finally:
        res["t1"] = time.time()
        c.close()


def served_ids(srv):
    """Request ids a replica answered (its event=request lines) and admitted (event=admitted)."""
    text = srv.log_text()
    return (set(re.findall(r"event=request id=(\S+)", text)), set(re.findall(r"event=admitted id=(\S+)", text)))


# ---- the test -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_lb_drain_and_rejoin(kind):
    if not shutil.which(kind):
        pytest.skip("%s is not installed (tools/install-deps.sh installs it: apt-get install %s)"
                    % (kind, "nginx-light" if kind == "nginx" else "haproxy"))
    tmp = tempfile.mkdtemp(prefix="vlmd-lb-%s-" % kind)
    replicas, lb, restarted = [], None, []
    try:
        replicas = [start_server(*replica_flags()) for _ in range(N_REPLICAS)]
        lb = Balancer(kind, replicas, tmp)
        _run(kind, lb, replicas, restarted)
    finally:
        if lb:
            lb.stop()
        for r in replicas + restarted:
            r.stop(signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(kind, lb, replicas, restarted_box):
    # Affinity: the same X-Session-Affinity value always lands on the same replica.
    aff = [chat(lb.port, "aff-%s-%d" % (kind, i), False, IMAGE_NAMES[0], 4, {"X-Session-Affinity": "user-42"})
           for i in range(4)]
    assert all(a["ok"] for a in aff), aff
    homes = {i for i, r in enumerate(replicas) for a in aff if a["rid"] in served_ids(r)[0]}
    assert len(homes) == 1, "affinity requests spread over replicas %s" % homes

    specs = []
    for i in range(N_REQUESTS):
        stream = i % 2 == 0
        specs.append(("lb-%s-%03d" % (kind, i), stream, IMAGE_NAMES[i % len(IMAGE_NAMES)],
                      STREAM_TOKENS if stream else PLAIN_TOKENS))
    results, lock = [], threading.Lock()
    nxt = iter(specs)
    done = threading.Event()

    def worker():
        while True:
            with lock:
                spec = next(nxt, None)
            if spec is None:
                return
            r = chat(lb.port, *spec)
            with lock:
                results.append(r)

    workers = [threading.Thread(target=worker) for _ in range(N_WORKERS)]
    for w in workers:
        w.start()

    # SIGTERM, mid-load, the replica with a stream running on it (a token already received).
    deadline = time.time() + 60
    victim = running = None
    while time.time() < deadline and victim is None:
        with lock:
            n_done = len(results)
            finished = {r["rid"] for r in results}
        if n_done >= SIGTERM_AFTER:
            for i, srv in enumerate(replicas):
                answered, admitted = served_ids(srv)
                live = [rid for rid in admitted - answered - finished if rid.startswith("lb-") and int(rid[-3:]) % 2 == 0]
                if live:
                    victim, running = i, live
                    break
        time.sleep(0.02)
    assert victim is not None, "no stream was running on any replica mid-load"
    vsrv = replicas[victim]
    t_sig = time.time()
    vsrv.proc.send_signal(signal.SIGTERM)
    # When the victim closed its listener (its log says so); from then on nothing new can reach it.
    closed_at = []

    def watch_close():
        while vsrv.proc.poll() is None and not closed_at:
            if "event=listener_closed" in vsrv.log_text():
                closed_at.append(time.time())
            time.sleep(0.01)
    watcher = threading.Thread(target=watch_close)
    watcher.start()
    try:
        rc = vsrv.proc.wait(DRAIN_DELAY_S + DRAIN_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        rc = None
    drain_s = time.time() - t_sig
    watcher.join()

    for w in workers:
        w.join(180)
    assert not any(w.is_alive() for w in workers), "clients hung"

    # Restart the drained replica on its port: back in rotation once /ready says so.
    restarted = start_server(*replica_flags(), "--port", str(vsrv.port))
    restarted_box.append(restarted)
    rejoin, t_re, k = [], time.time(), 0
    while time.time() - t_re < REJOIN_TIMEOUT_S:
        rid = "rejoin-%s-%03d" % (kind, k)
        k += 1
        rejoin.append(chat(lb.port, rid, k % 2 == 0, IMAGE_NAMES[k % len(IMAGE_NAMES)], 8))
        if rid in served_ids(restarted)[0]:
            break
        time.sleep(0.05)
    rejoin_s = time.time() - t_re

    # ---- verdicts ---------------------------------------------------------------------------
    bad = [r for r in results + rejoin if not r["ok"]]
    where = {}
    for i, srv in enumerate(replicas):
        for rid in served_ids(srv)[0]:
            where[rid] = i
    t_closed = closed_at[0] if closed_at else t_sig + DRAIN_DELAY_S
    late = [r["rid"] for r in results if r["t0"] > t_closed + ROUTE_MARGIN_S and where.get(r["rid"]) == victim]
    running_ok = [r for r in results if r["rid"] in running]
    counts = [sum(1 for r in results if where.get(r["rid"]) == i) for i in range(N_REPLICAS)]
    # Connects the draining replica refused, which the balancer passed on (nginx logs each one).
    refused = len(re.findall(r"Connection refused", lb.log()))
    summary = ("%s: requests=%d (+%d rejoin) errors=%d victim=r%d running_at_sigterm=%d drain_s=%.2f "
               "listener_closed_s=%.2f rejoin_s=%.2f per_replica=%s late_to_victim=%d refused_connects_logged=%d"
               % (kind, len(results), len(rejoin), len(bad), victim, len(running), drain_s, t_closed - t_sig,
                  rejoin_s, counts, len(late), refused))
    print(summary)
    with open(os.environ.get("VLMD_LB_REPORT", os.devnull), "a") as f:
        f.write(summary + "\n")

    diag = "\n".join([summary, "bad: %s" % bad[:5], "lb log:\n" + lb.log()[-3000:],
                      "victim log:\n" + vsrv.log_text()[-3000:]])
    assert len(results) == N_REQUESTS, diag
    assert not bad, diag
    assert rc == 0, diag
    assert drain_s < DRAIN_DELAY_S + DRAIN_TIMEOUT_S, diag
    assert "event=drain_timeout" not in vsrv.log_text(), diag          # nothing was cut
    assert "event=listener_closed" in vsrv.log_text() and closed_at, diag
    assert running_ok and all(r["ok"] for r in running_ok), diag        # its streams finished whole
    assert all(where.get(rid) == victim for rid in running), diag
    assert not late, diag                                                # new requests went elsewhere
    assert sum(counts) == N_REQUESTS and all(c > 0 for c in counts), diag
    assert rejoin and rejoin[-1]["rid"] in served_ids(restarted)[0], diag  # back in rotation
