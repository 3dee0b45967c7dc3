#!/usr/bin/env bash
# llamacpp_baseline.sh — measures llama.cpp on THIS machine on the same bf16 checkpoint, for the
# ratios in docs/cpu-kernels.md (issue 9) and docs/server.md (issue 7). llama.cpp is not a Debian
# package here, so its source comes from the llama-cpp-python sdist on PyPI (vendor/llama.cpp).
#   bash bench/llamacpp_baseline.sh MODEL_DIR [WORKDIR=/tmp/lcpp] [threads=2]
# e.g. python3 tools/make_model.py --out /tmp/models --name 2b-size --dtype bf16
#      bash bench/llamacpp_baseline.sh /tmp/models/2b-size
# Prints llama-bench pp512/tg32, llama-batched-bench at 1/4/16 sequences (32 prompt + 32 generated
# tokens each) and the 448x448 vision encode time of llama-mtmd-cli. Then run build/bench/model and
# build/bench/vision on MODEL_DIR in the same minutes to compare.
set -euo pipefail
model=${1:?MODEL_DIR}; work=${2:-/tmp/lcpp}; threads=${3:-2}
mkdir -p "$work" && cd "$work"
if [ ! -d src ]; then
    pip download -q --no-deps --no-binary :all: llama-cpp-python -d .
    mkdir -p src && tar xzf llama_cpp_python-*.tar.gz -C src --strip-components=1
fi
pip install -q sentencepiece numpy safetensors torch transformers
lc=src/vendor/llama.cpp
if [ ! -x $lc/build/bin/llama-mtmd-cli ]; then
    cmake -S $lc -B $lc/build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build $lc/build -j"$(nproc)" --target llama-bench llama-batched-bench llama-mtmd-cli >/dev/null
fi
export PYTHONPATH=$PWD/$lc/gguf-py
[ -f model.gguf ] || python3 $lc/convert_hf_to_gguf.py "$model" --outtype bf16 --outfile model.gguf
[ -f mmproj.gguf ] || python3 $lc/convert_hf_to_gguf.py "$model" --mmproj --outtype bf16 --outfile mmproj.gguf
python3 - <<'PY'
import numpy as np
from PIL import Image
r = np.random.default_rng(0); y, x = np.mgrid[0:448, 0:448]
a = np.stack([x * 255 / 447, y * 255 / 447, (x + y) * 255 / 894], -1) + r.normal(0, 8, (448, 448, 3))
Image.fromarray(a.clip(0, 255).astype("uint8")).save("img448.png")
PY
grep -m1 "model name" /proc/cpuinfo
$lc/build/bin/llama-bench -m model.gguf -t "$threads" -p 512 -n 32 -r 2
$lc/build/bin/llama-batched-bench -m model.gguf -t "$threads" -c 4096 -npp 32 -ntg 32 -npl 1,4,16 2>&1 | grep '^|'
$lc/build/bin/llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf --image img448.png -p "Describe." -n 1 \
    -t "$threads" --temp 0 2>&1 | grep -i "encoding done"
