"""test_deploy_files.py — the files under deploy/ agree with what vlmd really does.

- Kubernetes: every manifest parses; the container args are accepted by the real `vlmd serve`
  (run with them; its event=config line gives the effective drain settings); probe paths answer on a
  live server; ports and names line up; terminationGracePeriodSeconds covers preStop + drain delay
  + drain timeout; the ConfigMap equals configs/server; the HPA's metric is one vlmd exports.
- Dockerfiles: runtime stage packages cover every library build/vlmd needs (readelf + dpkg),
  non-root user, HEALTHCHECK on a path vlmd serves, read-only model volume, build stage has the
  -dev packages of tools/install-deps.sh; the entrypoint maps VLMD_* variables to flags (run).
- Load balancer configs: syntax-checked by nginx / haproxy themselves, and the settings the
  retry rules depend on are present and nothing more permissive is.
- deploy/examples/*.sh run against live servers (one with an API key); outputs checked.
Docker itself is not run here (no daemon in CI); test_deploy_lb.py runs the balancers for real.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import BIN, IMAGES, MODEL, MODELS, ROOT, _ensure_models, start_server

yaml = pytest.importorskip("yaml", reason="pyyaml is needed (tools/install-deps.sh installs it)")
sys.path.insert(0, str(ROOT / "deploy"))
import render  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
EXAMPLES = ROOT / "deploy" / "examples"
STARTUP_BUDGET_S = 300  # a startup probe shorter than this would kill pods loading a large model


def k8s_docs():
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        out[f.name] = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return out


def vlmd_effective_config(args, extra_env=None, entrypoint=False, timeout=30):
    """Starts vlmd with ARGS, returns (rc or None if it kept running, dict of its event=config
    line). The process is killed once the line is read: only the parsing is under test."""
    _ensure_models()
    env = dict(os.environ)
    env.pop("VLMD_API_KEY", None)
    env.update(extra_env or {})
    cmd = ([str(ROOT / "deploy" / "docker-entrypoint.sh")] if entrypoint else [BIN]) + list(args)
    if entrypoint:
        env["VLMD"] = BIN
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    cfg, lines = None, []
    deadline = time.time() + timeout
    try:
        for line in p.stderr:
            lines.append(line)
            if line.startswith("event=config"):
                cfg = dict((k, v.strip('"')) for k, v in re.findall(r'(\S+?)=("[^"]*"|\S+)', line[len("event=config"):]))
                break
            if time.time() > deadline:
                break
    finally:
        rc = p.poll()
        if rc is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
    assert cfg is not None, "vlmd printed no event=config line; it said:\n" + "".join(lines)
    return rc, cfg


def local_args(args):
    """The container's args made runnable here: /etc/vlmd -> configs/server, the model -> the test
    model, the address -> 127.0.0.1 and a free port (appended, so they win)."""
    out = []
    for a in args:
        a = a.replace("/etc/vlmd/", str(ROOT / "configs" / "server") + "/")
        if a.startswith("--model="):
            a = "--model=" + str(MODELS / MODEL)
        out.append(a)
    return out + ["--host", "127.0.0.1", "--port", "0"]


def flag_value(args, name):
    val = None
    for i, a in enumerate(args):
        if a.startswith("--%s=" % name):
            val = a.split("=", 1)[1]
        elif a == "--" + name and i + 1 < len(args):
            val = args[i + 1]
    return val


# ---- Kubernetes ---------------------------------------------------------------------------------

def test_k8s_manifests_parse_and_kustomization_lists_them():
    docs = k8s_docs()
    kinds = {d["kind"] for ds in docs.values() for d in ds if "kind" in d}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Kustomization"} <= kinds
    kust = docs["kustomization.yaml"][0]
    for r in kust["resources"]:
        assert (K8S / r).is_file(), r
    if shutil.which("kubectl"):  # kustomize is built into kubectl and works offline
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert len(list(yaml.safe_load_all(out.stdout))) == len(kust["resources"])


def test_k8s_configmap_equals_presets():
    cm = k8s_docs()["configmap.yaml"][0]
    files = {f.name: f.read_text() for f in (ROOT / "configs" / "server").glob("*.json")}
    assert cm["data"] == files, "deploy/k8s/configmap.yaml is out of date; regenerate it (see its header)"


@pytest.mark.parametrize("fname", ["deployment.yaml", "deployment-cuda.yaml"])
def test_k8s_deployment_agrees_with_vlmd(fname, server):
    dep = k8s_docs()[fname][0]
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    args = c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(flag_value(args, "port")) == ports["http"]
    assert flag_value(args, "host") == "0.0.0.0"  # reachable from the kubelet and the Service

    # vlmd itself parses the args (an unknown flag or bad value exits 2 before event=config).
    rc, cfg = vlmd_effective_config(["serve"] + local_args(args))
    assert rc in (None, 0, 1), "vlmd rejected the args of %s" % fname
    drain_timeout, drain_delay = float(cfg["drain-timeout"]), float(cfg["drain-delay"])
    if fname == "deployment-cuda.yaml":
        assert cfg["backend"] == "cuda"
        res = c["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]

    # Probes: the right endpoints, on the http port, and vlmd answers them.
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    sp = c["startupProbe"]
    assert sp["httpGet"]["port"] == "http" and sp["httpGet"]["path"] in ("/ready", "/health")
    assert sp["failureThreshold"] * sp["periodSeconds"] >= STARTUP_BUDGET_S
    for p in ("/ready", "/health"):
        assert server.request("GET", p)[0] == 200

    # Shutdown: preStop sleep, then SIGTERM: drain delay + drain timeout, all inside the grace period.
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = float(cmd[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain_delay + drain_timeout, \
        (pod["terminationGracePeriodSeconds"], pre_stop, drain_delay, drain_timeout)
    assert drain_delay > 0  # so a straggler routed here after SIGTERM is served, then refused

    # Read-only model mount, config from the ConfigMap, non-root.
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True
    assert flag_value(args, "model").startswith(mounts["models"]["mountPath"] + "/")
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["config"]["configMap"]["name"] == k8s_docs()["configmap.yaml"][0]["metadata"]["name"]
    assert flag_value(args, "config").startswith(mounts["config"]["mountPath"] + "/")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    # The Prometheus scrape annotation points at the port /metrics is served on.
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == ports["http"] and ann["prometheus.io/path"] == "/metrics"


def test_k8s_service_and_hpa(server):
    docs = k8s_docs()
    dep = docs["deployment.yaml"][0]
    svc = docs["service.yaml"][0]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])

    hpa = docs["hpa.yaml"][0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    st, _, metrics = server.request("GET", "/metrics")
    assert st == 200
    exported = set(re.findall(r"^# TYPE (\S+) gauge", metrics, re.M))
    adapter = (K8S / "prometheus-adapter-values.yaml").read_text()
    adapter_rules = yaml.safe_load(adapter)["rules"]["custom"]
    published = {r["name"]["as"] for r in adapter_rules}
    for m in hpa["spec"]["metrics"]:
        name = m["pods"]["metric"]["name"]
        assert name in exported, "%s is not a gauge on vlmd's /metrics (%s)" % (name, sorted(exported))
        assert name in published, "prometheus-adapter-values.yaml does not publish %s" % name


# ---- Docker -------------------------------------------------------------------------------------

def dockerfile_stages(path):
    """[(base image, stage name, [(instruction, argument text)])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            parts = rest.split()
            stages.append((parts[0], parts[2] if len(parts) > 2 else None, []))
        elif ins != "ARG" or stages:
            stages[-1][2].append((ins, rest.strip()))
    return stages


def apt_packages(run_text):
    m = re.search(r"apt-get install (.*?)(?:&&|$)", run_text)
    return {w for w in m.group(1).split() if not w.startswith("-")} if m else set()


def needed_packages():
    """Debian packages that provide the libraries build/vlmd is linked against (NEEDED entries)."""
    if not shutil.which("dpkg") or not shutil.which("readelf"):
        pytest.skip("dpkg/readelf not available to map libraries to packages")
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", subprocess.run(["readelf", "-d", BIN], capture_output=True,
                                                                   text=True, check=True).stdout)
    ldd = dict(re.findall(r"^\s*(\S+) => (\S+)", subprocess.run(["ldd", BIN], capture_output=True, text=True).stdout, re.M))
    pkgs = {}
    for lib in needed:
        path = ldd[lib]
        out = ""
        for p in (path, os.path.realpath(path), path.replace("/lib/", "/usr/lib/", 1)):
            r = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
            if r.returncode == 0:
                out = r.stdout
                break
        assert out, "no package owns %s" % path
        pkgs[lib] = out.split(":")[0]
    return pkgs


BASE_PACKAGES = {"libc6", "libgcc-s1"}  # in every debian/ubuntu base image
# A library package a listed one pulls in (libopenblas0 depends on one of its variants).
PROVIDED_BY = {"libopenblas0-pthread": "libopenblas0", "libopenblas0-openmp": "libopenblas0",
               "libopenblas0-serial": "libopenblas0"}


@pytest.mark.parametrize("fname", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile(fname, server):
    path = ROOT / "deploy" / fname
    stages = dockerfile_stages(path)
    assert len(stages) >= 2, "multi-stage build expected"
    build = stages[0]
    final = stages[-1]
    if fname == "Dockerfile.cuda":
        assert build[0].startswith("nvidia/cuda:") and "-devel-" in build[0]
        assert final[0].startswith("nvidia/cuda:") and "-runtime-" in final[0]
    else:
        assert build[0].startswith("debian:12") and final[0].startswith("debian:12")
    ins = lambda stage, name: [a for i, a in stage[2] if i == name]  # noqa: E731

    # Build stage: the toolchain and every -dev package tools/install-deps.sh installs.
    deps = (ROOT / "tools" / "install-deps.sh").read_text().replace("\\\n", " ")
    dev = {w for w in apt_packages(deps) if w.endswith("-dev")} | {"build-essential", "pkg-config"}
    build_pkgs = set().union(*(apt_packages(r) for r in ins(build, "RUN")))
    assert dev <= build_pkgs, "build stage lacks %s" % sorted(dev - build_pkgs)
    make = " ".join(r for r in ins(build, "RUN") if "make " in r)
    assert "build/vlmd" in make and (("CUDA=1" in make) == (fname == "Dockerfile.cuda"))
    for src in ins(build, "COPY"):
        assert (ROOT / src.split()[0]).exists(), src

    # Runtime stage: shared libraries only (no -dev, no compiler), covering what vlmd links.
    rt = set().union(*(apt_packages(r) for r in ins(final, "RUN")))
    assert not {p for p in rt if p.endswith("-dev") or p in ("build-essential", "gcc", "make")}
    for lib, pkg in needed_packages().items():
        pkg = PROVIDED_BY.get(pkg, pkg)
        assert pkg in rt or pkg in BASE_PACKAGES, "%s (%s) missing from the runtime stage of %s" % (pkg, lib, fname)

    # Non-root, read-only model volume, health check on a path vlmd serves, demo model default.
    (user,) = ins(final, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert re.search(r"useradd .*--uid (\d+)", " ".join(ins(final, "RUN"))).group(1) != "0"
    assert any("/models" in v for v in ins(final, "VOLUME"))
    (hc,) = ins(final, "HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*)", hc)
    assert url and url.group(2) == "/health" and server.request("GET", url.group(2))[0] == 200
    assert ins(final, "EXPOSE") == [url.group(1)]
    copies = ins(final, "COPY")
    assert any(c.endswith("/usr/share/vlmd/models/vlmd-demo") for c in copies)
    assert "/usr/share/vlmd/models/vlmd-demo" in (ROOT / "server" / "cmd_serve.c").read_text()
    for c in copies:
        if not c.startswith("--from"):
            assert (ROOT / c.split()[0]).exists(), c
    # The default command is accepted by vlmd (config preset path mapped to the repository).
    cmd = json.loads(ins(final, "CMD")[0])
    assert int(flag_value(cmd, "port")) == int(url.group(1))
    rc, cfg = vlmd_effective_config(["serve"] + local_args(cmd[:]))
    assert rc in (None, 0, 1)
    # The .dockerignore next to the Dockerfile lets every COPY source through.
    ign = (ROOT / "deploy" / (fname + ".dockerignore")).read_text().splitlines()
    allowed = {l[1:] for l in ign if l.startswith("!")}
    for c in ins(build, "COPY") + [c for c in copies if not c.startswith("--from")]:
        src = c.split()[0].rstrip("/")
        assert any(src == a or src.startswith(a + "/") for a in allowed), "%s is excluded by the .dockerignore" % src


def test_entrypoint_maps_env_to_flags():
    base = ["serve", "--model", str(MODELS / MODEL), "--host", "127.0.0.1", "--port", "0"]
    env = {"VLMD_MAX_SEQS": "3", "VLMD_ALLOW_REMOTE_MEDIA": "true", "VLMD_MAX_QUEUE": "7",
           "VLMD_API_KEY": "k-from-env"}
    rc, cfg = vlmd_effective_config(base + ["--max-queue", "5"], env, entrypoint=True)
    assert rc in (None, 0), cfg
    assert cfg["max-seqs"] == "3" and cfg["allow-remote-media"] == "true"
    assert cfg["max-queue"] == "5"            # an explicit flag wins over the environment
    assert cfg["api-key"] == "<set>"          # read by vlmd itself, never turned into a flag
    # A VLMD_* variable that is no flag (VLMD_TEST_MODELS, a typo) is reported and left out.
    r = subprocess.run([str(ROOT / "deploy" / "docker-entrypoint.sh"), "serve", "--no-such-flag"],
                       env=dict(os.environ, VLMD=BIN, VLMD_NO_SUCH="1"), capture_output=True, text=True, timeout=30)
    assert "ignoring VLMD_NO_SUCH" in r.stderr and r.returncode == 2 and "--no-such-flag" in r.stderr


# ---- load balancer configs ----------------------------------------------------------------------

def test_render_fills_replicas_and_listen():
    for name in ("nginx/vlmd.conf", "haproxy/vlmd.cfg"):
        src = (ROOT / "deploy" / name).read_text()
        out = render.render(src, ["10.1.2.3:9000", "10.1.2.4:9001"], "127.0.0.1:7777")
        assert out.count("10.1.2.3:9000") == 2 and out.count("10.1.2.4:9001") == 2  # both pools
        assert "127.0.0.1:8001" not in out and "127.0.0.1:7777" in out
        if name.startswith("haproxy"):
            assert "server r1 10.1.2.3:9000" in out and "server r2 10.1.2.4:9001" in out


def test_nginx_config():
    text = (ROOT / "deploy" / "nginx" / "vlmd.conf").read_text()
    conf = "\n".join(l.split("#")[0] for l in text.splitlines())
    assert re.search(r"upstream vlmd \{\s*least_conn;", conf)
    assert re.search(r"hash \$http_x_session_affinity consistent;", conf)
    (nu,) = re.findall(r"proxy_next_upstream ([^;]*);", conf)
    assert nu.split() == ["error", "timeout"]  # never non_idempotent, never on an HTTP status
    assert "proxy_buffering off;" in conf
    assert int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1)) > 600  # --request-timeout default
    assert "keepalive" not in conf
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (tools/install-deps.sh installs nginx-light)")
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "vlmd.conf").write_text(render.render(text, ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3"))
        (pathlib.Path(d) / "main.conf").write_text(
            "pid %s/nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n include %s/vlmd.conf;\n}\n" % (d, d))
        r = subprocess.run(["nginx", "-t", "-q", "-c", d + "/main.conf", "-p", d], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_haproxy_config():
    text = (ROOT / "deploy" / "haproxy" / "vlmd.cfg").read_text()
    conf = "\n".join(l.split("#")[0].rstrip() for l in text.splitlines())
    assert re.findall(r"^\s*retry-on (.*)$", conf, re.M) == ["conn-failure"]
    assert re.search(r"^\s*option redispatch$", conf, re.M)
    assert re.search(r"^\s*balance leastconn$", conf, re.M)
    assert re.search(r"^\s*balance hdr\(X-Session-Affinity\)$", conf, re.M)
    assert len(re.findall(r"http-check send meth GET uri /ready", conf)) == 2
    assert all("check" in l.split() for l in conf.splitlines() if l.strip().startswith("server "))
    if not shutil.which("haproxy"):
        pytest.skip("haproxy is not installed (tools/install-deps.sh installs it)")
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as f:
        f.write(render.render(text, ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3"))
        f.flush()
        r = subprocess.run(["haproxy", "-c", "-q", "-f", f.name], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


# ---- curl scripts -------------------------------------------------------------------------------

def run_example(name, *args, url, key=None, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith("VLMD_")}
    e["VLMD_URL"] = url
    if key:
        e["VLMD_API_KEY"] = key
    e.update(env or {})
    return subprocess.run(["bash", str(EXAMPLES / name)] + list(args), capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.fixture(scope="module")
def keyed():
    if not (shutil.which("curl") and shutil.which("jq")):
        pytest.skip("curl and jq are needed by deploy/examples (tools/install-deps.sh installs jq)")
    srv = start_server("--api-key", "s3cret")
    yield srv
    srv.stop()


def test_examples_against_live_server(keyed):
    url, key = keyed.url, "s3cret"
    auth = {"Authorization": "Bearer " + key}
    img = IMAGES / "grad_112.png"

    r = run_example("models.sh", url=url, key=key)
    assert r.returncode == 0, r.stderr
    ctx = keyed.request("GET", "/v1/models", headers=auth)[2]["data"][0]["max_model_len"]
    assert r.stdout == "%s\tmax_model_len=%d\n" % (MODEL, ctx)

    # chat-image.sh: the answer equals the same request made directly (the model's generation
    # config is greedy: top_k 1), so the image really went through as a data URL.
    r = run_example("chat-image.sh", str(img), "What is this?", url=url, key=key, env={"VLMD_MAX_TOKENS": "12"})
    assert r.returncode == 0, r.stderr
    from conftest import data_url
    st, _, direct = keyed.request("POST", "/v1/chat/completions", {"max_tokens": 12, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "What is this?"}]}]},
        headers=auth)
    assert st == 200 and direct["usage"]["prompt_tokens"] > 20  # image tokens included
    assert r.stdout == direct["choices"][0]["message"]["content"] + "\n"

    # chat-stream.sh: the same text, token by token, then a newline.
    r = run_example("chat-stream.sh", "What is this?", str(img), url=url, key=key, env={"VLMD_MAX_TOKENS": "12"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == direct["choices"][0]["message"]["content"] + "\n"

    # Tokens are printed as they arrive: the first bytes come well before the end of the stream.
    e = {k: v for k, v in os.environ.items() if not k.startswith("VLMD_")}
    e.update(VLMD_URL=url, VLMD_API_KEY=key, VLMD_MAX_TOKENS="600", VLMD_MODEL=MODEL)
    p = subprocess.Popen(["bash", str(EXAMPLES / "chat-stream.sh"), "Tell a long story."], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=e)
    t0 = time.time()
    first = p.stdout.read1(1) if hasattr(p.stdout, "read1") else os.read(p.stdout.fileno(), 1)
    t_first = time.time() - t0
    rest = p.stdout.read()
    p.wait(120)
    t_end = time.time() - t0
    assert p.returncode == 0 and first and rest.endswith(b"\n")
    assert t_first < t_end / 2, "first output at %.2fs of %.2fs: the stream is buffered" % (t_first, t_end)

    r = run_example("completions.sh", "The capital of France is", url=url, key=key, env={"VLMD_MAX_TOKENS": "7"})
    assert r.returncode == 0, r.stderr
    st, _, direct = keyed.request("POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 7},
                                  headers=auth)
    assert r.stdout == direct["choices"][0]["text"] + "\n"


def test_examples_report_http_errors(keyed):
    url = keyed.url
    for script, args in [("models.sh", []), ("chat-image.sh", [str(IMAGES / "tiny_40x30.png")]),
                         ("chat-stream.sh", ["hi"]), ("completions.sh", ["hi"])]:
        r = run_example(script, *args, url=url)  # no key
        assert r.returncode != 0 and r.stdout.strip() == "", (script, r.stdout)
        assert "invalid_api_key" in r.stderr and "error" in r.stderr, (script, r.stderr)
        if script != "chat-stream.sh":
            assert "HTTP 401" in r.stderr
        if script == "models.sh":
            continue
        r = run_example(script, *args, url=url, key="s3cret", env={"VLMD_MODEL": "no-such-model"})
        assert r.returncode != 0 and "model_not_found" in r.stderr, (script, r.stderr)
    # Nothing listening: a clear message, not a stack of curl output.
    r = run_example("models.sh", url="http://127.0.0.1:9")
    assert r.returncode != 0 and "could not reach http://127.0.0.1:9" in r.stderr
    r = run_example("chat-stream.sh", "hi", url="http://127.0.0.1:9")
    assert r.returncode != 0 and "failed" in r.stderr
