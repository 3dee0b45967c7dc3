#!/usr/bin/env bash
# tokenizer.sh — encode throughput of vlmd's tokenizer vs Hugging Face `tokenizers`, single thread,
# same deterministic ~10 MB mixed corpus, same run. Prints both figures and the ratio
# vlmd / max(HF line-by-line, HF batch). Token counts must agree (same ids on the same lines).
#   bench/tokenizer.sh [MEGABYTES] [REPEATS]     (defaults 10, 3; needs `make` first)
set -eu
cd "$(dirname "$0")/.."
MB=${1:-10}
REP=${2:-3}
BUILD=${BUILD:-build}
TOK=tests/data/tokenizer/qwen
CORPUS=$(mktemp /tmp/vlmd-tok-corpus.XXXXXX)
trap 'rm -f "$CORPUS"' EXIT
python3 bench/tokenizer_corpus.py "$CORPUS" "$MB"
echo "corpus: $(wc -c <"$CORPUS") bytes, $(wc -l <"$CORPUS") lines"
V=$("$BUILD"/bench/tokenizer "$TOK" "$CORPUS" "$REP")
H=$(RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python3 bench/tokenizer_hf.py "$TOK/tokenizer.json" "$CORPUS" "$REP")
echo "$V"
echo "$H"
get() { echo "$1" | sed -n "s/^$2=//p"; }
vt=$(get "$V" vlmd_tokens); ht=$(get "$H" hf_tokens)
[ "$vt" = "$ht" ] || echo "WARNING: token counts differ (vlmd $vt, hf $ht)"
python3 -c "
v=float('$(get "$V" vlmd_mb_s)'); l=float('$(get "$H" hf_line_mb_s)'); b=float('$(get "$H" hf_batch_mb_s)')
print(f'vlmd {v:.2f} MB/s, HF best {max(l,b):.2f} MB/s (line {l:.2f}, batch {b:.2f}): ratio {v/max(l,b):.2f}x')"
