"""test_nvlm_server.py — NVLM-D served through the same server: `vlmd serve` and `vlmd generate` on
tools/make_model.py's tiny-nvlm (NVLM-D checkpoint layout, InternViT with a dummy head, Qwen tokenizer,
ChatML template), checked against tests/fixtures/nvlm/served.json, which tools/make_nvlm.py --served computes
with transformers' InternVLForConditionalGeneration on the same weights: the prompt token ids (chat template +
tile tags + 256 image tokens per tile) and 16 greedy tokens, bit-exact (f32 model; the reference's smallest
top-1/top-2 logit gap over these steps is ~0.05, far above f32 rounding), for text only, one 4-tile image, two
images (1 + 4 tiles), streaming included. No model-specific flag is given: the family comes from config.json."""
import json
import pathlib
import subprocess

import pytest

from conftest import BIN, GREEDY, MODELS, ROOT, case_messages, data_url, start_server

NVLM = "tiny-nvlm"
FIX = json.loads((ROOT / "tests" / "fixtures" / "nvlm" / "served.json").read_text())
CASES = FIX["cases"]
STEPS = FIX["greedy_steps"]
IMG_CTX = "<|vision_pad|>"


@pytest.fixture(scope="module")
def nvlm_server():
    srv = start_server("--max-seqs", "4", model=NVLM)
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log_text()[-4000:]


@pytest.fixture(scope="module")
def nvlm_client(nvlm_server):
    import openai
    return openai.OpenAI(base_url=nvlm_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def nvlm_tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MODELS / NVLM / "tokenizer.json"))


def served_messages(case):
    return case_messages({"messages": case["messages"]})


def test_fixture_is_meaningful():
    # the image cases must differ from each other after the shared start, or the images would not matter
    assert CASES["image"]["greedy_ids"] != CASES["two_images"]["greedy_ids"]
    assert CASES["image"]["n_tiles"] == [4] and CASES["two_images"]["n_tiles"] == [1, 4]
    for c in CASES.values():
        assert c["min_top2_gap"] > 1e-3
        n_ctx = sum(1 for t in c["prompt_ids"] if t == 151654)
        assert n_ctx == 256 * sum(c["n_tiles"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_matches_reference(nvlm_client, nvlm_tok, name):
    case = CASES[name]
    r = nvlm_client.chat.completions.create(model=NVLM, messages=served_messages(case), max_tokens=STEPS,
                                            extra_body=dict(GREEDY, ignore_eos=True))
    assert r.usage.prompt_tokens == case["n_prompt"]
    assert r.usage.completion_tokens == STEPS
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == nvlm_tok.decode(case["greedy_ids"], skip_special_tokens=True)


def test_stream_matches_reference(nvlm_client, nvlm_tok):
    case = CASES["two_images"]
    stream = nvlm_client.chat.completions.create(model=NVLM, messages=served_messages(case), max_tokens=STEPS,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=dict(GREEDY, ignore_eos=True))
    text, finish, usage, n_chunks = "", None, None, 0
    for ch in stream:
        n_chunks += 1
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert n_chunks > 3
    assert text == nvlm_tok.decode(case["greedy_ids"], skip_special_tokens=True)
    assert finish == "length"
    assert usage.prompt_tokens == case["n_prompt"] and usage.completion_tokens == STEPS


@pytest.mark.parametrize("name,tp", [(n, 1) for n in sorted(CASES)] + [("two_images", 2)])
def test_generate_cli_exact_ids(tmp_path, name, tp):
    """`vlmd generate --json` reports the ids themselves: prompt and continuation equal the reference. With --tp 2
    the InternViT heads/MLP/mlp1 and the decoder are split over 2 CPU ranks; the ids must still be equal."""
    case = CASES[name]
    msgs = json.loads(json.dumps(case["messages"]))
    for m in msgs:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image_url":
                    p["image_url"]["url"] = str(ROOT / p["image_url"]["url"])
    f = tmp_path / "messages.json"
    f.write_text(json.dumps(msgs))
    out = subprocess.run([BIN, "generate", "--model", str(MODELS / NVLM), "--messages", str(f), "--max-tokens",
                          str(STEPS), "--greedy", "--ignore-eos", "--json", "--threads", "2", "--tp", str(tp)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    j = json.loads(out.stdout)
    assert j["prompt_tokens"] == case["prompt_ids"]
    assert j["token_ids"] == case["greedy_ids"]


def test_detail_low_is_one_tile(nvlm_server, nvlm_tok):
    """detail "low" keeps one tile: the prompt is the template around <Image><tile_global_thumbnail>
    + 256 context tokens + </Image>, tokenized as a whole (the tags are plain text)."""
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(ROOT / "tests/data/images/wide_200x60.png"),
                                            "detail": "low"}},
        {"type": "text", "text": "Describe this image."}]}]
    st, _, body = nvlm_server.request("POST", "/v1/chat/completions",
                                      dict(GREEDY, model=NVLM, messages=msgs, max_tokens=1))
    assert st == 200, body
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<Image>"
            "<tile_global_thumbnail>" + IMG_CTX * 256 + "</Image>\nDescribe this image.<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert body["usage"]["prompt_tokens"] == len(nvlm_tok.encode(want, add_special_tokens=False).ids)


def test_placeholder_errors(nvlm_server):
    img = {"type": "image_url", "image_url": {"url": data_url(ROOT / "tests/data/images/grad_224.png")}}
    # more "<image>" placeholders in the text than images in the message
    msgs = [{"role": "user", "content": [img, {"type": "text", "text": "<image> and <image>?"}]}]
    st, _, body = nvlm_server.request("POST", "/v1/chat/completions", dict(model=NVLM, messages=msgs, max_tokens=1))
    assert st == 400 and "placeholder" in body["error"]["message"], body
    # the image context token typed as text
    msgs = [{"role": "user", "content": [img, {"type": "text", "text": "look: " + IMG_CTX}]}]
    st, _, body = nvlm_server.request("POST", "/v1/chat/completions", dict(model=NVLM, messages=msgs, max_tokens=1))
    assert st == 400 and "context tokens" in body["error"]["message"], body
    # a placeholder the user places is used for the image (no extra one is added)
    msgs = [{"role": "user", "content": [img, {"type": "text", "text": "Here: <image>\nWhat is it?"}]}]
    st, _, body = nvlm_server.request("POST", "/v1/chat/completions", dict(model=NVLM, messages=msgs, max_tokens=1))
    assert st == 200, body


def test_model_listed(nvlm_server):
    st, _, body = nvlm_server.request("GET", "/v1/models")
    assert st == 200 and [m["id"] for m in body["data"]] == [NVLM]
