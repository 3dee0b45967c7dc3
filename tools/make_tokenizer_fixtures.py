#!/usr/bin/env python3
"""make_tokenizer_fixtures.py — writes the tokenizer golden fixtures under tests/fixtures/tokenizer/.

The oracle is the Hugging Face `tokenizers` library (Tokenizer.from_file on the committed copy of the
Qwen tokenizer, tests/data/tokenizer/qwen/tokenizer.json) for encode/decode, and `transformers`
(PreTrainedTokenizerFast.apply_chat_template, tokenize=False) for chat templates. Seeded: the same
library versions give byte-identical files.

Outputs (JSON lines, UTF-8):
  encode.jsonl  {"text": str, "ids": [int]}                        (add_special_tokens=False)
  decode.jsonl  {"ids": [int], "skip": bool, "text": str, "hex": str} (Tokenizer.decode; "hex" is the
                text's UTF-8 bytes, because decoded text may contain NUL, which cJSON strings cannot hold)
  encode_flags.jsonl  first line {"mods": {content: {flag: bool}}}, then {"text", "ids"}: the same
                tokenizer with lstrip/rstrip/single_word/normalized switched on for some added tokens
                (the C test applies the same mods to a temp copy), to check those AddedVocabulary rules
  templates.json  the Qwen2-VL and ChatML template texts used (the C test also renders them with its
                Jinja subset and expects the same strings)
  chat.jsonl    {"kind": "qwen2_vl"|"chatml"|"shipped" (the tokenizer_config.json template, Qwen3's), "messages": [...], "gen": bool, "text": str, "ids": [int]}
  meta.json     library versions and template sources

Template sources:
  QWEN2_VL_TEMPLATE: the chat_template of Qwen/Qwen2-VL-2B-Instruct (chat_template.json /
    tokenizer_config.json of that repository), written out here from its published text and
    cross-checked against copies of that template quoted in public repositories (code search for
    "{% set image_count = namespace(value=0) %}"); its behaviour is the one the project SPEC §F.2
    describes, which the C renderer implements independently.
  CHATML_TEMPLATE: the chat_template of Qwen/Qwen2-7B-Instruct (tokenizer_config.json), the plain
    ChatML with default system prompt "You are a helpful assistant.".
No string in the fixtures contains NUL (the C side reads them through cJSON, which stops at NUL).
"""
import json
import os
import random
import sys
import unicodedata

import tokenizers
import transformers
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKDIR = os.path.join(ROOT, "tests", "data", "tokenizer", "qwen")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
SEED = 20261125

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
            "<|fim_prefix|>", "<|box_start|>"]

SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéèêëàçñöüßøåÆŒ",
    "digits": "0123456789٠١٢٣٤٥٦٧٨٩०१२३४५६७८९",
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之過來說",
    "jp": "あいうえおかきくけこアイウエオカキクケコー。、",
    "kr": "한국어텍스트입니다가나다라마바사",
    "arabic": "العربيةمرحباكيفحالكاليوم",
    "hindi": "हिन्दीनमस्तेआपकैसेहैं",
    "thai": "ภาษาไทยสวัสดีครับขอบคุณ",
    "cyr": "Русскийязыкпривет",
    "greek": "ΑΒΓΔαβγδελληνικά",
    "emoji": "😀😂👍🏽👩‍💻🧑🏿‍🤝‍🧑🏻👨‍👩‍👧‍👦🏳️‍🌈❤️🔥✨🇯🇵",
    "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”‘’—–…·•¿¡",
    "space": " \t\n\r\u00a0\u2003\u3000\u200b\u2028\x0b\x0c\x85",
    "combining": "e\u0301a\u0308o\u0303n\u0303\u0327\u0300\u0323",
    "control": "\x01\x02\x07\x1b\x7f\x9f",
}


def rand_mixed(rng, n):
    keys = list(SCRIPTS)
    out = []
    while len(out) < n:
        k = rng.choice(keys)
        run = rng.randint(1, 12)
        out.extend(rng.choice(SCRIPTS[k]) for _ in range(run))
    return "".join(out[:n])


def hard_strings(rng):
    s = []
    # Fixed hand-written cases.
    s += ["", " ", "  ", "\n", "\r\n", "\t", "Hello world", "don't", "<Image><tile_1>",
          " 12345", "1234567890123456789012345678901234567890", "a  b   c    d",
          "x\n\n\ny", "x \n y", "line1\r\nline2\r\n\r\n", "   leading", "trailing   ",
          "\t\tdef f(x):\r\n\t\treturn x  # comment\r\n", "café", "cafe\u0301", "Å", "A\u030a",
          "ﬁ ligature", "한국어", "\u1100\u1161\u11a8", "👩🏽‍🚀", "🇺🇳🏴‍☠️",
          "<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_end|>", "a<|endoftext|>b",
          "<|im_start", "|im_end|>", "<<|im_end|>>", "<think>x</think>", " <tool_call> ",
          "I'M YOU'RE WE'VE THEY'LL HE'D IT'S DON'T", "i'm you're we've they'll he'd it's",
          "I'm You'Re wE'vE", "'s 't 're 've 'm 'll 'd", "''''", "a'b'c", "’s", "x's's",
          "\u00a0\u00a0x", "\u3000全角", "a\u200bb", "\x0b\x0c", "tab\tsep\tvalues",
          "http://example.com/path?q=1&r=2#frag", "foo@bar.com", "$1,234.56", "3.14159e-10",
          "C++ && ||", "=====", "-----\n-----", "```python\nprint('x')\n```", "{\"a\": [1, 2]}",
          "ǅungla", "İstanbul ıi", "ΣΊΣΥΦΟΣ", "ﬀ", "Ⅻ", "²³", "①②", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001F600" * 20,
          "a" * 3000, "ab" * 1500, " " * 500, "\n" * 300, "9" * 1000, "é" * 800,
          "supercalifragilisticexpialidocious" * 30, "\t" * 100 + "x", "x" + " " * 50 + "\n" + " " * 50]
    # Code with tabs and CRLF.
    code_lines = ["int main(void) {", "\treturn 0;", "}", "def f(a, b):", "    return a+b",
                  "for (i = 0; i < n; i++) x[i] = y[i] * 2;", "#include <stdio.h>",
                  "    if x == 1:  # tricky", "\t\t\tdeep();", "SELECT * FROM t WHERE id=42;"]
    for _ in range(300):
        lines = [rng.choice(code_lines) for _ in range(rng.randint(1, 8))]
        sep = rng.choice(["\n", "\r\n", "\n\n", "\r\n\r\n", " \n", "\t\n"])
        s.append(sep.join(lines) + rng.choice(["", "\n", "\r\n", "  "]))
    # Whitespace runs and digits.
    ws = [" ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u3000", "\u2003"]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 10)):
            parts.append("".join(rng.choice(ws) for _ in range(rng.randint(0, 6))))
            parts.append(rng.choice(["x", "word", "12", "3.5", "!", "你好", "é", "1" * rng.randint(1, 40)]))
        s.append("".join(parts))
    # Contractions in all cases.
    words = ["I", "you", "we", "they", "it", "he", "she", "that", "don", "can", "won"]
    sfx = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL", "'D", "'x"]
    for _ in range(200):
        t = " ".join(rng.choice(words) + rng.choice(sfx) for _ in range(rng.randint(1, 6)))
        s.append(t if rng.random() < 0.5 else t.upper())
    # Mixed scripts.
    for _ in range(1100):
        s.append(rand_mixed(rng, rng.randint(1, 80)))
    # NFC/NFD pairs.
    bases = ["café", "naïve", "Ångström", "Việt Nam", "한국어", "ḍḥṛ", "e\u0301\u0301", "o\u0308\u0304"]
    for b in bases:
        for form in ("NFC", "NFD", "NFKC", "NFKD"):
            s.append(unicodedata.normalize(form, b))
    for _ in range(150):
        t = rand_mixed(rng, rng.randint(1, 40))
        s.append(unicodedata.normalize("NFD", t))
    # Special tokens embedded in text.
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rand_mixed(rng, rng.randint(0, 10)))
            parts.append(rng.choice(SPECIALS))
        s.append("".join(parts))
    # Very long words.
    for _ in range(40):
        s.append("".join(rng.choice(SCRIPTS[rng.choice(["latin", "cjk", "thai", "hindi"])])
                         for _ in range(rng.randint(200, 1500))))
    # Random bytes decoded as UTF-8 with replacement (no NUL).
    for _ in range(500):
        b = bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 60)))
        s.append(b.decode("utf-8", errors="replace"))
    # Control characters.
    for _ in range(100):
        s.append("".join(chr(rng.choice(list(range(1, 32)) + list(range(127, 160))))
                         if rng.random() < 0.5 else rng.choice("ab c") for _ in range(rng.randint(1, 30))))
    return s


def messages_cases(rng, vision):
    cases = []
    texts = ["Hello", "Describe this image.", "What is 2+2?", "  spaced  \n text\n", "你好，世界",
             "Line1\nLine2", "emoji 👍🏽", "<|im_start|> literal", ""]
    for i in range(60):
        msgs = []
        if rng.random() < 0.4:
            msgs.append({"role": "system", "content": rng.choice(["You are terse.", "Sys\nprompt", "", "日本語で"])})
        for turn in range(rng.randint(1, 4)):
            if vision and rng.random() < 0.7:
                parts = []
                for _ in range(rng.randint(1, 5)):
                    r = rng.random()
                    if r < 0.35:
                        parts.append({"type": "image"})
                    elif r < 0.45:
                        parts.append({"type": "video"})
                    else:
                        parts.append({"type": "text", "text": rng.choice(texts)})
                msgs.append({"role": "user", "content": parts})
            else:
                msgs.append({"role": "user", "content": rng.choice(texts)})
            if turn < 3 and rng.random() < 0.8:
                msgs.append({"role": "assistant", "content": rng.choice(texts)})
        if rng.random() < 0.15 and len(msgs) > 1:
            msgs.append({"role": "system", "content": "late system"})
        cases.append((msgs, i % 3 != 0))
    return cases


def dec_line(tok, ids, skip):
    text = tok.decode(ids, skip_special_tokens=skip)
    return json.dumps({"ids": ids, "skip": skip, "text": text, "hex": text.encode("utf-8").hex()},
                      ensure_ascii=False) + "\n"


def main():
    rng = random.Random(SEED)
    os.makedirs(OUT, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(TOKDIR, "tokenizer.json"))

    strings = hard_strings(rng)
    assert all("\x00" not in t for t in strings)
    with open(os.path.join(OUT, "encode.jsonl"), "w", encoding="utf-8") as f:
        for t in strings:
            ids = tok.encode(t, add_special_tokens=False).ids
            f.write(json.dumps({"text": t, "ids": ids}, ensure_ascii=False) + "\n")

    # Decode: ids from the encode set plus random ids including lone byte tokens (invalid UTF-8).
    vocab = tok.get_vocab()
    byte_tokens = [vocab[c] for c in ("Ā", "ā", "Ġ", "Ċ", "ł", "Ń", "ð", "Ł", "¿", "Ã", "â", "ģ")]
    high = sorted(i for t, i in vocab.items() if len(t) == 1)  # get_vocab() order is not stable
    n_dec = 0
    with open(os.path.join(OUT, "decode.jsonl"), "w", encoding="utf-8") as f:
        for t in strings[::5]:
            ids = tok.encode(t, add_special_tokens=False).ids
            for skip in (False, True):
                f.write(dec_line(tok, ids, skip))
                n_dec += 1
        for _ in range(600):
            ids = []
            for _ in range(rng.randint(1, 20)):
                r = rng.random()
                if r < 0.4:
                    ids.append(rng.choice(high))
                elif r < 0.55:
                    ids.append(rng.choice(byte_tokens))
                elif r < 0.7:
                    ids.append(rng.randint(151643, 151668))
                else:
                    ids.append(rng.randint(0, 151642))
            skip = rng.random() < 0.5
            f.write(dec_line(tok, ids, skip))
            n_dec += 1

    # Added-token flags: none are set in the Qwen file, so exercise them on a modified copy.
    mods = {"<|im_end|>": {"lstrip": True, "rstrip": True}, "<|im_start|>": {"rstrip": True},
            "<think>": {"single_word": True}, "</think>": {"normalized": True},
            "<tool_call>": {"lstrip": True, "single_word": True}}
    j = json.load(open(os.path.join(TOKDIR, "tokenizer.json"), encoding="utf-8"))
    for a in j["added_tokens"]:
        a.update(mods.get(a["content"], {}))
    tmp = os.path.join(OUT, ".flags-tokenizer.json")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False)
    ftok = Tokenizer.from_file(tmp)
    os.remove(tmp)
    pieces = list(mods) + ["a", "word", "x_y", "é", "日本", "1", "!", " ", "  ", "\n", "\t", "\u3000", "\u00a0",
                           " \n ", "e\u0301", "_"]
    n_flags = 0
    with open(os.path.join(OUT, "encode_flags.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"mods": mods}) + "\n")
        for _ in range(800):
            t = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"text": t, "ids": ftok.encode(t, add_special_tokens=False).ids},
                               ensure_ascii=False) + "\n")
            n_flags += 1

    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(TOKDIR, "tokenizer.json"))
    n_chat = 0
    with open(os.path.join(OUT, "chat.jsonl"), "w", encoding="utf-8") as f:
        shipped = json.load(open(os.path.join(TOKDIR, "tokenizer_config.json"), encoding="utf-8"))["chat_template"]
        for kind, tmpl, vision in (("qwen2_vl", QWEN2_VL_TEMPLATE, True), ("chatml", CHATML_TEMPLATE, False),
                                   ("shipped", shipped, False)):
            cases = messages_cases(rng, vision)
            if kind == "shipped":  # Qwen3's template: thinking blocks in assistant turns too
                for msgs, _ in cases[::3]:
                    for m in msgs:
                        if m["role"] == "assistant" and rng.random() < 0.5:
                            m["content"] = "<think>\nreasoning " + m["content"] + "\n</think>\n\n" + m["content"]
            for msgs, gen in cases:
                text = hf.apply_chat_template(msgs, chat_template=tmpl, tokenize=False, add_generation_prompt=gen)
                ids = tok.encode(text, add_special_tokens=False).ids
                f.write(json.dumps({"kind": kind, "messages": msgs, "gen": gen, "text": text, "ids": ids},
                                   ensure_ascii=False) + "\n")
                n_chat += 1

    with open(os.path.join(OUT, "templates.json"), "w", encoding="utf-8") as f:
        json.dump({"qwen2_vl": QWEN2_VL_TEMPLATE, "chatml": CHATML_TEMPLATE}, f, ensure_ascii=False, indent=1)

    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump({"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
                   "python": sys.version.split()[0], "seed": SEED, "n_encode": len(strings),
                   "n_decode": n_dec, "n_chat": n_chat, "n_flags": n_flags,
                   "tokenizer": "tests/data/tokenizer/qwen/tokenizer.json",
                   "qwen2_vl_template": "Qwen/Qwen2-VL-2B-Instruct chat_template (see script)",
                   "chatml_template": "Qwen/Qwen2-7B-Instruct chat_template (see script)"}, f, indent=1)
    print(f"encode {len(strings)}, decode {n_dec}, chat {n_chat}")


if __name__ == "__main__":
    main()
