"""test_cli.py — `vlmd serve` command line: --help lists every flag (the same names as the JSON
config keys), bad flags and a missing model fail with a message and a non-zero status, and a
--config preset file is accepted."""
import json
import subprocess

from conftest import BIN, ROOT, start_server

FLAGS = ["--model", "--model-name", "--host", "--port", "--api-key", "--threads", "--kv-memory", "--max-seqs",
         "--max-batch-tokens", "--max-queue", "--max-body-bytes", "--max-images", "--max-image-pixels",
         "--max-tokens-default", "--max-tokens-limit", "--request-timeout", "--drain-timeout",
         "--allow-remote-media", "--allow-private-media", "--config"]


def test_help_lists_flags():
    out = subprocess.run([BIN, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for f in FLAGS:
        assert f in out.stdout, f
    # every flag documented in docs/server.md too
    doc = (ROOT / "docs" / "server.md").read_text()
    for f in FLAGS:
        assert "`" + f in doc, f


def test_bad_flags_and_missing_model():
    r = subprocess.run([BIN, "serve", "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown flag" in r.stderr
    r = subprocess.run([BIN, "serve", "--max-seqs", "zero"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    r = subprocess.run([BIN, "serve", "--model", "/nonexistent/model", "--port", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "event=load" in r.stderr


def test_config_file_preset(tmp_path):
    cfg = json.loads((ROOT / "configs" / "server" / "small-cpu.json").read_text())
    cfg.update({"max_queue": 5, "port": 0})
    p = tmp_path / "serve.json"
    p.write_text(json.dumps(cfg))
    srv = start_server("--config", str(p), "--max-seqs", "3")
    try:
        log = srv.log_text()
        assert "max-queue=5" in log and "max-seqs=3" in log and "kv-memory=1073741824" in log
        st, _, body = srv.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert st == 200, body
    finally:
        assert srv.stop() == 0
