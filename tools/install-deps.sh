#!/usr/bin/env bash
# install-deps.sh — installs what vlmd needs to build and test on a fresh Debian 12 machine:
# the -dev packages (apt) and the Python test tools (pip). Run as root (CI is root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    build-essential pkg-config curl ca-certificates python3 python3-pip \
    libmicrohttpd-dev libcjson-dev libstb-dev libpcre2-dev libutf8proc-dev libwebp-dev libjpeg62-turbo-dev \
    libopenblas-dev libcurl4-openssl-dev \
    nginx-light haproxy jq >/dev/null
# nginx-light and haproxy: tests/integration/test_deploy_lb.py runs the deploy/ load-balancer
# configs (as foreground processes on loopback ports; the packages' own services are not needed).
# jq: the deploy/examples curl scripts.
# Python: numpy writes the generated test checkpoints; pytest, openai and requests drive the server;
# pyyaml parses deploy/k8s in tests/integration/test_deploy_files.py.
python3 -m pip install -q --disable-pip-version-check numpy pytest openai requests pillow pyyaml tokenizers 2>&1 \
    | grep -v "Running pip as the 'root' user" || true
