"""`trimmer root bench --proxies`: the root's CPU per request beside nginx's and HAProxy's, load from wrk, one run.

Why this shape: a proxy's cost is CPU per request, and only a comparison run
side by side on the same machine, payload and upstream says whether the root
is cheap. The load comes from `wrk` (C, outside Python) so the generator does
not compete with the root for the interpreter, and the upstream is an nginx
that reads and drops the body (`return 200`), so it costs little and the same
for every proxy. Each proxy's CPU is read from /proc (psutil) before and after
each phase; phases alternate over ROUNDS rounds so a noisy stretch hits all.

    wrk ──> nginx proxy_pass ────┐
    wrk ──> haproxy ─────────────┤
    wrk ──> trimmer root (off) ──┼──> nginx sink (reads the body, answers {"ok":true})
    wrk ──> trimmer root (trim) ─┘
    wrk ──────────────────────────> nginx sink directly (for added latency)

Needs `wrk`, `nginx` and (optionally) `haproxy` on PATH: Debian/Ubuntu
`apt-get install wrk nginx-light haproxy`. Without wrk or nginx it says so
and exits 2; without haproxy that row is left out. `--baseline-python PY`
adds a second root (pass and trim) started by another interpreter, e.g. an
older checkout's venv, to compare two builds in the same run.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .root import upstream_bytes_per_request, write_root_config

ROUNDS = 3


@dataclass
class Target:
    name: str
    url: str
    pids: list[int]  # processes whose CPU is the proxy's (empty: the direct row)
    cpu: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    p50_ms: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # CPU ms per request, each round


def _free_port() -> int:
    from loadtest.procs import free_port

    return free_port()


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


def _nginx_conf(tmp: Path, port: int, upstream: int | None) -> Path:
    """One worker, keep-alive both sides; as a proxy the body is buffered in memory (client_body_buffer_size)."""
    if upstream is None:
        location = 'default_type application/json; return 200 \'{"ok":true}\';'
        extra = ""
    else:
        location = ('proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; '
                    "proxy_request_buffering on; proxy_buffering on;")
        extra = f"upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
    d = tmp / f"nginx-{port}"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  client_max_body_size 64m; client_body_buffer_size 4m;
  keepalive_requests 1000000; keepalive_timeout 75s;
  {extra}
  server {{ listen 127.0.0.1:{port}; location / {{ {location} }} }}
}}
""")
    return conf


def _haproxy_conf(tmp: Path, port: int, upstream: int) -> Path:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
  maxconn 4096
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server s1 127.0.0.1:{upstream}
""")
    return conf


def _root_conf(tmp: Path, allow: frozenset[str], sink_port: int, slow_port: int) -> Path:
    """The reference root in front of the nginx sink, plus `ref_slow`: a model that answers after a second, so that
    requests pile up in flight (for RSS)."""
    return write_root_config(
        tmp, allow, {"sink": {"replicas": [f"http://127.0.0.1:{sink_port}"], "health_path": "/"},
                     "slow": {"replicas": [f"http://127.0.0.1:{slow_port}"], "max_connections": 256}},
        {"ref": "sink", "ref_pass": "sink", "ref_slow": "slow"},
        limits={"max_body_bytes": 64 * 1024 * 1024}, timeouts={"request_s": 10})


def _wrk(url: str, script: Path, connections: int, seconds: float, threads: int = 1,
         failures: list[int] | None = None) -> tuple[int, float, float]:
    """(requests, seconds, p50 ms) of one wrk run. Non-2xx answers are an error, unless `failures` is given: then
    their count is appended there (the RSS phases report them instead of losing the whole run)."""
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                          "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", text)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed on {url}: {out.stderr.strip()[:300] or text[:300]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad and failures is None:
        raise RuntimeError(f"{url} answered non-2xx: {text[:500]}")
    if failures is not None:
        failures.append(int(bad.group(1)) if bad else 0)
    secs = float(m.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(3)]
    p = re.search(r"50%\s+([\d.]+)(us|ms|s)", text)
    p50 = float(p.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p.group(2)] if p else float("nan")
    return int(m.group(1)), secs, p50


def _cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    import psutil

    proc = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.02)
    out.append(peak)


def _rss(pid: int, url: str | None, script: Path, connections: int, seconds: float,
         failures: list[int] | None = None) -> int:
    """Peak RSS of `pid` while wrk loads `url` (its current RSS when url is None); non-2xx answers are counted in
    `failures`."""
    import psutil

    if url is None:
        return psutil.Process(pid).memory_info().rss
    peak: list[int] = []
    stop = threading.Event()
    th = threading.Thread(target=_peak_rss, args=(pid, stop, peak))
    th.start()
    try:
        _wrk(url, script, connections, seconds, threads=2, failures=failures)
    finally:
        stop.set()
        th.join()
    return peak[0]


def missing_tools() -> list[str]:
    return [t for t in ("wrk", "nginx") if shutil.which(t) is None]


def run_proxy_bench(seconds: float = 5.0, connections: int = 8, out: str | None = None, seed: int = 0,
                    baseline_python: str | None = None, inflight: int = 64) -> int:
    missing = missing_tools()
    if missing:
        print(f"trimmer root bench --proxies: {', '.join(missing)} not installed (Debian: apt-get install wrk "
              "nginx-light haproxy)", file=sys.stderr)
        return 2
    from loadtest.payload import reference_payload
    from loadtest.procs import ManagedProcess, start

    body, allow = reference_payload(seed)
    procs: list[subprocess.Popen] = []
    roots: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as d:
        tmp = Path(d)
        (tmp / "body.bin").write_bytes(body)
        script = tmp / "post.lua"
        script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/msgpack"\n'
                          f'local f = io.open("{tmp / "body.bin"}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
        try:
            sink = _free_port()
            procs.append(
                subprocess.Popen(["nginx", "-c", str(_nginx_conf(tmp, sink, None))], stderr=subprocess.DEVNULL))
            _wait_port(sink)
            targets = [Target("direct (no proxy)", f"http://127.0.0.1:{sink}/v1/models/ref/versions/1/score", [])]
            port = _free_port()
            procs.append(
                subprocess.Popen(["nginx", "-c", str(_nginx_conf(tmp, port, sink))], stderr=subprocess.DEVNULL))
            _wait_port(port)
            targets.append(Target("nginx passthrough", f"http://127.0.0.1:{port}/v1/models/ref/score", [procs[-1].pid]))
            if shutil.which("haproxy"):
                port = _free_port()
                procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(_haproxy_conf(tmp, port, sink))],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                _wait_port(port)
                targets.append(
                    Target("haproxy passthrough", f"http://127.0.0.1:{port}/v1/models/ref/score", [procs[-1].pid]))
            slow = _free_port()  # the stand-in model, answering after 1 s: for RSS with requests in flight
            procs.append(subprocess.Popen([sys.executable, "-m", "loadtest.sink", "--port", str(slow),
                                           "--small", "--delay-ms", "1000"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_port(slow)
            cfg = _root_conf(tmp, allow, sink, slow)
            builds = [("root", None)] + ([("baseline root", baseline_python)] if baseline_python else [])
            root_ports: dict[str, int] = {}
            for label, python in builds:
                rport = _free_port()
                env = {"TRIMMER_LOG_LEVEL": "WARNING"}
                cmd = ["root", "--config", str(cfg), "--port", str(rport)]
                if python:  # another build: its own interpreter, run from its own tree
                    root = ManagedProcess(label.replace(" ", "-"), [python, "-m", "trimmer", *cmd],
                                          f"http://127.0.0.1:{rport}",
                                          tmp / "baseline.log", env=env, cwd=Path(tempfile.gettempdir())).start()
                    root.wait_ready("/readyz", 30)
                else:
                    root = start(label.replace(" ", "-"), cmd, rport, "/readyz", tmp, timeout=30, env=env)
                roots.append(root)
                root_ports[label] = rport
                targets.append(
                    Target(f"{label} passthrough (mode off)", f"{root.url}/v1/models/ref_pass/score", [root.pid]))
                targets.append(Target(f"{label} trim", f"{root.url}/v1/models/ref/score", [root.pid]))
            for t in targets:  # warm-up: connections, caches, buffer pools
                _wrk(t.url, script, connections, 1)
            for _ in range(ROUNDS):
                for t in targets:
                    c0 = _cpu(t.pids) if t.pids else 0.0
                    n, secs, _ = _wrk(t.url, script, connections, seconds)
                    used = (_cpu(t.pids) - c0) if t.pids else 0.0
                    t.cpu += used
                    t.rounds.append(used / max(n, 1) * 1000)
                    t.requests += n
                    t.seconds += secs
            for _ in range(2):  # sequential latency: one connection, one request at a time
                for t in targets:
                    t.p50_ms.append(_wrk(t.url, script, 1, max(2.0, seconds / 2))[2])
            rss: dict[str, dict[str, float]] = {}
            for root, (label, _) in zip(roots, builds):
                failures: list[int] = []
                rss[label] = {"idle_mib": _rss(root.pid, None, script, 0, 0) / 2**20,
                              # `inflight` requests waiting on a 1 s model at once (the measure)
                              "slow_model_peak_mib": _rss(root.pid, f"{root.url}/v1/models/ref_slow/score", script,
                                                          inflight, max(4.0, seconds), failures) / 2**20,
                              # `inflight` connections sending bodies as fast as they can (bodies being received)
                              "flood_peak_mib": _rss(root.pid, f"{root.url}/v1/models/ref/score", script, inflight,
                                                     max(3.0, seconds), failures) / 2**20}
                rss[label]["non_2xx"] = sum(failures)
            sent = {label: upstream_bytes_per_request(f"http://127.0.0.1:{p}") for label, p in root_ports.items()}
        finally:
            for root in roots:
                root.stop()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    return _report(targets, body, allow, connections, rss, sent, out, inflight)


def _report(targets: list[Target], body: bytes, allow: frozenset[str], connections: int,
            rss: dict[str, dict[str, float]], sent: dict[str, dict[str, float]], out: str | None, inflight: int) -> int:
    direct = targets[0]
    nginx = next(t for t in targets if t.name.startswith("nginx"))
    nginx_ms = nginx.cpu / nginx.requests * 1000
    direct_p50 = statistics.median(direct.p50_ms)
    print(f"reference payload {len(body):,} bytes, 2,000 features, {len(allow)} allowlisted; wrk -c{connections}, "
          f"{ROUNDS} alternating rounds; upstream: nginx reading and dropping the body")
    print(f"{'proxy':38} {'CPU ms/req':>10} {'x nginx':>8} {'per round':>11} {'req/s':>8} {'p50 ms':>8} "
          f"{'added p50':>10}")
    rows = []
    for t in targets:
        cpu_ms = t.cpu / t.requests * 1000 if t.pids else float("nan")
        p50 = statistics.median(t.p50_ms)
        # The ratio to nginx in each round (the two ran minutes apart at most): the spread says how noisy the run was.
        per_round = [a / b for a, b in zip(t.rounds, nginx.rounds)] if t.pids else []
        row = {"proxy": t.name, "cpu_ms_per_request": cpu_ms, "x_nginx": cpu_ms / nginx_ms if t.pids else None,
               "x_nginx_per_round": per_round,
               "requests_per_s": t.requests / t.seconds, "p50_ms": p50,
               "added_p50_ms": p50 - direct_p50 if t.pids else None}
        rows.append(row)
        x = f"{cpu_ms / nginx_ms:8.2f}" if t.pids else f"{'':8}"
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else ""
        added = f"{p50 - direct_p50:10.3f}" if t.pids else f"{'':10}"
        print(f"{t.name:38} {cpu_ms:10.3f} {x} {spread:>11} {row['requests_per_s']:8.0f} {p50:8.3f} {added}")
    for label, r in rss.items():
        print(f"{label}: RSS idle {r['idle_mib']:.0f} MiB; peak with {inflight} requests waiting on a 1 s model "
              f"{r['slow_model_peak_mib']:.0f} MiB; peak with {inflight} connections flooding "
              f"{r['flood_peak_mib']:.0f} MiB" + (f" ({r['non_2xx']:.0f} non-2xx answers meanwhile)"
                                                  if r.get("non_2xx") else ""))
    for label, s in sent.items():
        print(
            f"{label}: upstream bytes / request  passthrough {s.get('ref_pass', 0):,.0f}   trim {s.get('ref', 0):,.0f}")
    if out:
        Path(out).write_text(
            json.dumps({"rows": rows, "rss": rss, "upstream_bytes": sent, "payload_bytes": len(body)}, indent=1))
    return 0


__all__ = ["run_proxy_bench", "missing_tools"]
