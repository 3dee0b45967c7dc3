"""test_generate.py — `vlmd generate` end to end against the transformers fixtures.

For every case in tests/fixtures/qwen2vl/<model>/<case>/ (made by tools/make_fixtures.py), runs the
real binary on the case's messages (images as files, through the same prompt pipeline as the server)
and checks: prompt ids equal, the 32 greedy tokens equal (f32 models; the bf16 model is computed in
f32 from its bf16 weights, so it is compared with the f32-upcast reference), and first-step logits
within LOGITS_TOL.
"""
import glob
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("VLMD_BIN", os.path.join(ROOT, "build", "vlmd"))
MODELS = os.environ.get("VLMD_TEST_MODELS", os.path.join(ROOT, "build", "models"))
# f32 logits bound from the issue; observed ~2e-5 (the reference's own generate-vs-forward noise
# is 2.7e-5, tools/README.md).
LOGITS_TOL = 1e-3
# JPEG: stb_image and Pillow's libjpeg-turbo decode the test JPEG differently by up to 2 LSB in 6.1% of
# values (tools/README.md), which moves this random model's logits by ~0.13; only prompt ids are exact.
JPEG_LOGITS_TOL = 0.5

CASES = sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/qwen2vl/*/*/case.json")))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "/".join(c.split("/")[-3:-1]))
def test_generate_matches_transformers(case):
    with open(case) as f:
        fx = json.load(f)
    model_dir = os.path.join(MODELS, fx["model"])
    if not os.path.isdir(model_dir):
        pytest.fail(f"test model missing: {model_dir} (tools/make_model.py --test-set)")
    bf16 = fx.get("dtype", "").lower() in ("bf16", "bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        msgs = os.path.join(tmp, "messages.json")
        with open(msgs, "w") as f:
            json.dump(fx["messages"], f)
        npy = os.path.join(tmp, "logits.npy")
        r = subprocess.run([BIN, "generate", "--model", model_dir, "--messages", msgs, "--greedy",
                            "--ignore-eos", "--max-tokens", "32", "--json", "--threads", "2",
                            "--dump-logits", npy], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        logits = np.load(npy)
    assert out["prompt_tokens"] == fx["prompt_ids"]
    jpeg = any(str(p.get("image_url", {}).get("url", "")).endswith(".jpg")
               for m in fx["messages"] if isinstance(m.get("content"), list) for p in m["content"])
    want = fx["greedy_ids_f32ref"] if bf16 else fx["greedy_ids"]
    if not jpeg:
        assert out["token_ids"] == want
    ref_name = "logits0_f32ref.npy" if bf16 else "logits0.npy"
    ref = np.load(os.path.join(os.path.dirname(case), ref_name))
    assert logits.shape == (32, ref.shape[0])
    diff = float(np.abs(logits[0] - ref).max())
    assert diff <= (JPEG_LOGITS_TOL if jpeg else LOGITS_TOL), diff


def test_generate_bad_image_is_clean_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    r = subprocess.run([BIN, "generate", "--model", os.path.join(MODELS, "tiny-f32-tied"),
                        "--prompt", "hi", "--image", str(bad), "--max-tokens", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "image" in r.stderr.lower()
