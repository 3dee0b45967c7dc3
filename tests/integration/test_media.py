"""test_media.py — http(s) image URLs: refused unless --allow-remote-media; with it, loopback
(private) addresses are still refused unless --allow-private-media; with both, the fetched image
gives exactly the prompt tokens and output of the same image sent as a data: URL. A size limit
applies while downloading. Only loopback traffic: the image host is a local http.server."""
import functools
import http.server
import threading

import pytest

from conftest import GREEDY, IMAGES, MODEL, image_part, start_server


@pytest.fixture(scope="module")
def image_host():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(IMAGES))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield "http://127.0.0.1:%d" % httpd.server_address[1]
    httpd.shutdown()


def msgs(url_part):
    return [{"role": "user", "content": [url_part, {"type": "text", "text": "What is it?"}]}]


def remote(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_remote_disabled_by_default(server, image_host):
    st, _, body = server.chat(msgs(remote(image_host + "/grad_112.png")), max_tokens=1)
    assert st == 400 and "allow-remote-media" in body["error"]["message"]


def test_remote_private_refused_then_allowed(image_host):
    srv = start_server("--allow-remote-media", "--max-image-bytes", "200K")
    try:
        st, _, body = srv.chat(msgs(remote(image_host + "/grad_112.png")), max_tokens=1)
        assert st == 400 and "private" in body["error"]["message"], body
        assert body["error"]["param"] == "messages[0].content[0].image_url.url"
    finally:
        assert srv.stop() == 0
    srv = start_server("--allow-remote-media", "--allow-private-media", "--max-image-bytes", "4K")
    try:
        kw = dict(GREEDY, max_tokens=6, ignore_eos=True)
        st, _, a = srv.chat(msgs(remote(image_host + "/tiny_40x30.png")), **kw)
        assert st == 200, a
        st, _, b = srv.chat(msgs(image_part("tiny_40x30.png")), **kw)
        assert st == 200
        # the second request may read the first one's prompt from the prefix cache
        assert {k: a["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
            {k: b["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        st, _, body = srv.chat(msgs(remote(image_host + "/missing.png")), max_tokens=1)
        assert st == 400 and body["error"]["code"] == "invalid_image"
        st, _, body = srv.chat(msgs(remote(image_host + "/grad_112.png")), max_tokens=1)  # 29 KB > 4K
        assert st == 400 and body["error"]["code"] == "limit_exceeded", body
    finally:
        assert srv.stop() == 0
