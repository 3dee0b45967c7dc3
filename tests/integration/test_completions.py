"""test_completions.py — /v1/completions: string and token-id prompts, echo, FIM with the Qwen
FIM tokens (suffix), n > 1, stop strings, legacy logprobs, streaming."""
from conftest import GREEDY, MODEL, fixture_case


def test_token_ids_prompt_matches_reference(client, tokenizer):
    case = fixture_case("text")
    r = client.completions.create(model=MODEL, prompt=case["prompt_ids"], max_tokens=32,
                                  extra_body=dict(GREEDY, ignore_eos=True))
    assert r.usage.prompt_tokens == case["n_prompt"] == len(case["prompt_ids"])
    assert r.choices[0].text == tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
    assert r.object == "text_completion"


def test_string_prompt_equals_ids(client, tokenizer):
    case = fixture_case("text")
    a = client.completions.create(model=MODEL, prompt=case["prompt_text"], max_tokens=12,
                                  extra_body=dict(GREEDY, ignore_eos=True))
    b = client.completions.create(model=MODEL, prompt=case["prompt_ids"], max_tokens=12,
                                  extra_body=dict(GREEDY, ignore_eos=True))
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].text == b.choices[0].text


def test_echo(client):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, echo=True,
                                  extra_body=GREEDY)
    assert r.choices[0].text.startswith("Once upon")


def test_fim_suffix(client, tokenizer):
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    fim = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=8,
                                    extra_body=dict(GREEDY, ignore_eos=True))
    ids = tokenizer.encode("<|fim_prefix|>" + prefix + "<|fim_suffix|>" + suffix + "<|fim_middle|>").ids
    assert fim.usage.prompt_tokens == len(ids)
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, extra_body=dict(GREEDY, ignore_eos=True))
    assert fim.choices[0].text == same.choices[0].text


def test_n_and_stop_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=5, n=2, logprobs=2,
                                  extra_body=dict(GREEDY, ignore_eos=True))
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    if not any("\ufffd" in t for t in lp.tokens):
        assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 10
    first = r.choices[0].text
    if len(first) > 2:
        s = client.completions.create(model=MODEL, prompt="The", max_tokens=5, stop=[first[1:3]],
                                      extra_body=dict(GREEDY, ignore_eos=True))
        assert s.choices[0].text == first[: first.index(first[1:3])] and s.choices[0].finish_reason == "stop"


def test_completion_stream(client):
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, extra_body=dict(GREEDY, ignore_eos=True))
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=10, stream=True,
                                            extra_body=dict(GREEDY, ignore_eos=True)))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
