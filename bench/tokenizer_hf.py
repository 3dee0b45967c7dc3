#!/usr/bin/env python3
"""tokenizer_hf.py — the Hugging Face `tokenizers` reference for bench/tokenizer.sh: single-thread
encode throughput on the same corpus, line by line (Tokenizer.encode) and in batches
(Tokenizer.encode_batch, 1024 lines each), best of REPEATS. Run it with RAYON_NUM_THREADS=1 and
TOKENIZERS_PARALLELISM=false so the batch path stays on one thread.
usage: tokenizer_hf.py TOKENIZER_JSON CORPUS [REPEATS]  -> prints hf_line_mb_s=, hf_batch_mb_s=, hf_tokens="""
import sys
import time

from tokenizers import Tokenizer


def main():
    tok = Tokenizer.from_file(sys.argv[1])
    data = open(sys.argv[2], "rb").read()
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    lines = data.decode("utf-8").split("\n")
    mb = len(data) / 1e6
    best_line = best_batch = 1e30
    ntok = 0
    for _ in range(repeats):
        t = time.perf_counter()
        ntok = 0
        for ln in lines:
            ntok += len(tok.encode(ln, add_special_tokens=False).ids)
        best_line = min(best_line, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, len(lines), 1024):
            tok.encode_batch(lines[i:i + 1024], add_special_tokens=False)
        best_batch = min(best_batch, time.perf_counter() - t)
    print(f"hf_line_mb_s={mb / best_line:.2f}")
    print(f"hf_batch_mb_s={mb / best_batch:.2f}")
    print(f"hf_tokens={ntok}")


if __name__ == "__main__":
    main()
