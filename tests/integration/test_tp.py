"""test_tp.py — tensor parallelism and backend selection through the real binary.

`vlmd generate --tp N` (CPU rank threads) must give the transformers fixture's greedy tokens and the
tp 1 logits within TP_LOGITS_TOL, with text and image prompts; `vlmd serve --tp 2` must answer like
tp 1 and log its memory plan; bad --tp / --backend / --gpus values are clean errors with exit 1.
"""
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

from conftest import BIN, GREEDY, MODELS, ROOT, case_messages, fixture_case, start_server

# Same bound as tests/unit/test_tp.c: sharding only reorders f32 sums; measured <= 2.1e-5 over every
# generated step on the test models.
TP_LOGITS_TOL = 1e-4
GEN = 16


def _generate(model, case, *flags):
    fx = fixture_case(case, model)
    with tempfile.TemporaryDirectory() as tmp:
        msgs = os.path.join(tmp, "messages.json")
        with open(msgs, "w") as f:
            json.dump(fx["messages"], f)
        npy = os.path.join(tmp, "logits.npy")
        r = subprocess.run([BIN, "generate", "--model", str(MODELS / model), "--messages", msgs, "--greedy",
                            "--ignore-eos", "--max-tokens", str(GEN), "--json", "--threads", "2",
                            "--dump-logits", npy] + list(flags), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return fx, json.loads(r.stdout), np.load(npy)


@pytest.mark.parametrize("model,case,tp", [
    ("tiny-f32-tied", "text", 2),
    ("tiny-f32-tied", "image", 4),
    ("tiny-f32-tied", "two_images", 2),
    ("small-f32-hd32", "image", 4),
])
def test_generate_tp_matches_tp1(model, case, tp):
    fx, out1, lg1 = _generate(model, case)
    _, outn, lgn = _generate(model, case, "--tp", str(tp))
    assert outn["prompt_tokens"] == fx["prompt_ids"]
    assert outn["token_ids"] == fx["greedy_ids"][:GEN]
    assert outn["token_ids"] == out1["token_ids"]
    assert lgn.shape == lg1.shape == (GEN, lg1.shape[1])
    diff = float(np.abs(lgn - lg1).max())
    assert diff <= TP_LOGITS_TOL, diff


def _run(*args):
    return subprocess.run([BIN] + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_generate_refuses_uneven_split():
    r = _run("generate", "--model", str(MODELS / "tiny-f32-tied"), "--prompt", "hi", "--max-tokens", "2",
             "--tp", "3")
    assert r.returncode == 1
    assert "n_heads (4)" in r.stderr and "3" in r.stderr


def test_generate_refuses_bad_backend_and_gpus():
    m = str(MODELS / "tiny-f32-tied")
    r = _run("generate", "--model", m, "--prompt", "hi", "--backend", "tpu")
    assert r.returncode == 1 and "not cpu or cuda" in r.stderr
    r = _run("generate", "--model", m, "--prompt", "hi", "--gpus", "0,1", "--tp", "2")
    assert r.returncode == 1 and "--backend cuda" in r.stderr


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a GPU is present; the refusal is for GPU-less machines")
def test_backend_cuda_without_gpu_is_exit_1():
    r = _run("generate", "--model", str(MODELS / "tiny-f32-tied"), "--prompt", "hi", "--backend", "cuda")
    assert r.returncode == 1
    assert "CUDA" in r.stderr or "cuda" in r.stderr
    r = _run("serve", "--model", str(MODELS / "tiny-f32-tied"), "--port", "0", "--backend", "cuda")
    assert r.returncode == 1
    assert "backend" in r.stderr and "cuda" in r.stderr


def test_serve_tp2_answers_like_generate():
    fx, out1, _ = _generate("tiny-f32-tied", "image")
    srv = start_server("--tp", "2", "--kv-memory", "1M")
    try:
        st, _, body = srv.chat(case_messages(fx), max_tokens=GEN, **GREEDY)
        assert st == 200, body
        assert body["choices"][0]["message"]["content"] == out1["text"]
        log = srv.log_text()
        assert "event=engine plan=" in log and "tp 2" in log and "KV pages" in log, log
    finally:
        assert srv.stop() == 0, srv.log_text()[-4000:]
