"""conftest.py — starts the real `vlmd serve` for the integration tests.

Nothing is built here: the binary is $VLMD_BIN (tests/run.sh sets it) or build/vlmd. Test
checkpoints come from tools/make_model.py (numpy, deterministic, cached by a stamp) into
$VLMD_TEST_MODELS or build/models. Each server listens on 127.0.0.1 with --port 0; the port is read
from its `event=listening` log line, so there is no race for a "free" port. Only loopback traffic.
"""
import base64
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("VLMD_BIN", str(ROOT / "build" / "vlmd"))
MODELS = pathlib.Path(os.environ.get("VLMD_TEST_MODELS", str(ROOT / "build" / "models")))
MODEL = "tiny-f32-tied"
IMAGES = ROOT / "tests" / "data" / "images"
START_TIMEOUT_S = 60


def data_url(path, mime=None):
    path = pathlib.Path(path)
    if mime is None:
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}[path.suffix]
    return "data:%s;base64,%s" % (mime, base64.b64encode(path.read_bytes()).decode())


def image_part(name, **extra):
    iu = {"url": data_url(IMAGES / name)}
    iu.update(extra)
    return {"type": "image_url", "image_url": iu}


class Server:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.url = "http://127.0.0.1:%d" % port

    def request(self, method, path, body=None, headers=None, raw=None, timeout=120):
        """Returns (status, headers, parsed JSON or text)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, text = r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            status, hdrs, text = e.code, dict(e.headers), e.read().decode()
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def chat(self, messages, **kw):
        body = {"model": MODEL, "messages": messages}
        body.update(kw)
        return self.request("POST", "/v1/chat/completions", body)

    def log_text(self):
        return "".join(self.log)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _ensure_models():
    MODELS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_model.py"), "--out", str(MODELS), "--test-set"],
                   check=True, stdout=subprocess.DEVNULL)
    return MODELS


def start_server(*flags, model=MODEL, env=None):
    if not os.path.exists(BIN):
        pytest.fail("vlmd binary not found at %s (build it with make, or set VLMD_BIN)" % BIN)
    models = _ensure_models()
    cmd = [BIN, "serve", "--model", str(models / model), "--model-name", model, "--host", "127.0.0.1",
           "--port", "0", "--threads", "2", "--read-timeout", "3", "--ping-interval", "0.5"] + list(flags)
    e = dict(os.environ)
    e.pop("VLMD_API_KEY", None)
    e.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=e)
    log = []
    port_box = []
    ev = threading.Event()

    def reader():
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"event=listening .*port=(\d+)", line)
            if m:
                port_box.append(int(m.group(1)))
                ev.set()
        ev.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ev.wait(START_TIMEOUT_S) or not port_box:
        proc.kill()
        pytest.fail("vlmd did not start listening:\n" + "".join(log))
    srv = Server(proc, port_box[0], log)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("vlmd exited with %s:\n%s" % (proc.returncode, "".join(log)))
        st, _, _ = srv.request("GET", "/ready", timeout=5)
        if st == 200:
            return srv
        time.sleep(0.05)
    srv.stop(signal.SIGKILL)
    pytest.fail("vlmd never became ready:\n" + "".join(log))


@pytest.fixture(scope="session")
def server():
    srv = start_server("--max-seqs", "16", "--max-queue", "256", "--max-body-bytes", "8M")
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log_text()[-4000:]


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer
    _ensure_models()
    return Tokenizer.from_file(str(MODELS / MODEL / "tokenizer.json"))


def fixture_case(name, model=MODEL):
    return json.loads((ROOT / "tests" / "fixtures" / "qwen2vl" / model / name / "case.json").read_text())


def case_messages(case):
    """The fixture's messages with local image paths turned into data: URLs."""
    out = []
    for m in case["messages"]:
        m = json.loads(json.dumps(m))
        if isinstance(m.get("content"), list):
            for p in m["content"]:
                if p.get("type") == "image_url":
                    p["image_url"]["url"] = data_url(ROOT / p["image_url"]["url"])
        out.append(m)
    return out


# Sampling that makes the server's greedy output comparable with the fixtures' greedy_ids
# (the models' generation_config sets temperature 0.1 / top_k 1 / repetition_penalty 1.05).
GREEDY = {"temperature": 0, "top_p": 1, "top_k": -1, "repetition_penalty": 1.0}
