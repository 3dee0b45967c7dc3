#!/usr/bin/env python3
"""render.py — fills the replica list and the listen address into deploy/nginx/vlmd.conf or
deploy/haproxy/vlmd.cfg, so the shipped files are used as they are (by you, and by
tests/integration/test_deploy_lb.py).

    python3 deploy/render.py deploy/haproxy/vlmd.cfg --listen 0.0.0.0:8080 \\
        --replica 10.0.0.11:8000 --replica 10.0.0.12:8000 > /etc/haproxy/haproxy.cfg

Every block between "# replicas: begin" and "# replicas: end" becomes one line per replica, made
from the block's first server line with its address (and, for HAProxy, its name) replaced. The line
marked "# listen" (nginx) or "# bind" (HAProxy) gets the listen address. Standard library only.
"""
import argparse
import re
import sys

ADDR = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d+")


def render(text, replicas, listen=None):
    out, block = [], None
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if s == "# replicas: begin":
            out.append(line)
            block = []
            continue
        if s == "# replicas: end":
            tmpl = next((b for b in block if b.strip().startswith("server ")), None)
            if tmpl is None:
                raise ValueError("a replicas block has no server line to copy")
            for i, r in enumerate(replicas, 1):
                ln = ADDR.sub(r, tmpl, count=1)
                # HAProxy names its servers: "server r1 ADDR ..."
                ln = re.sub(r"^(\s*server\s+)r\d+(\s)", r"\g<1>r%d\2" % i, ln)
                out.append(ln)
            out.append(line)
            block = None
            continue
        if block is not None:
            block.append(line)
            continue
        if listen and s.endswith("# listen"):
            line = re.sub(r"listen\s+\S+;", "listen %s;" % listen, line)
        if listen and s.endswith("# bind"):
            line = re.sub(r"bind\s+\S+", "bind %s" % listen, line)
        out.append(line)
    if block is not None:
        raise ValueError("unterminated replicas block")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="deploy/nginx/vlmd.conf or deploy/haproxy/vlmd.cfg")
    ap.add_argument("--replica", action="append", required=True, metavar="HOST:PORT")
    ap.add_argument("--listen", metavar="[HOST:]PORT", help="address the load balancer listens on")
    a = ap.parse_args()
    for r in a.replica:
        if not ADDR.fullmatch(r):
            ap.error("--replica %r is not HOST:PORT" % r)
    with open(a.config) as f:
        sys.stdout.write(render(f.read(), a.replica, a.listen))


if __name__ == "__main__":
    main()
