#!/usr/bin/env python3
"""tokenizer_corpus.py — writes a deterministic ~10 MB mixed-script corpus for bench/tokenizer.sh.

Lines mix English prose, code (tabs, CRLF-free), digits, CJK, Arabic, Hindi, Thai, Cyrillic and
emoji, drawn with a fixed seed from small vocabularies so words repeat as in real text.
usage: tokenizer_corpus.py OUT [MEGABYTES]"""
import random
import sys

SEED = 12345
EN = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
      "have an they you were her she there been one all we their has would when if so no will can "
      "model server request token image vision language processing throughput latency don't it's "
      "we're they'll I've Hello World Internationalization").split()
CODE = ["def", "return", "for", "i", "in", "range(n):", "x[i]", "=", "y[i]", "*", "2;", "{", "}", "int",
        "main(void)", "#include", "<stdio.h>", "if", "(x", "==", "0)", "self.weight", "np.zeros((3,", "4))"]
CJK = list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之過來說")
OTHER = ["مرحبا", "كيف", "حالك", "नमस्ते", "आप", "कैसे", "हैं", "สวัสดี", "ครับ", "привет", "мир",
         "日本語", "テキスト", "한국어", "😀", "👍🏽", "👩‍💻", "🇯🇵"]


def line(rng):
    r = rng.random()
    if r < 0.5:
        return " ".join(rng.choice(EN) for _ in range(rng.randint(5, 40))) + rng.choice([".", "!", "?", ","])
    if r < 0.7:
        return "\t" * rng.randint(0, 3) + " ".join(rng.choice(CODE) for _ in range(rng.randint(3, 15)))
    if r < 0.8:
        return "".join(rng.choice(CJK) for _ in range(rng.randint(10, 60))) + "。"
    if r < 0.9:
        return " ".join(rng.choice(OTHER) for _ in range(rng.randint(3, 20)))
    return " ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(2, 10)))


def main():
    out = sys.argv[1]
    target = int(float(sys.argv[2]) * 1e6) if len(sys.argv) > 2 else 10_000_000
    rng = random.Random(SEED)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        while n < target:
            s = line(rng) + "\n"
            f.write(s)
            n += len(s.encode("utf-8"))


if __name__ == "__main__":
    main()
