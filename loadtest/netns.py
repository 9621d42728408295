"""Optional constrained link: the leaf inside a network namespace behind a veth pair shaped with `tc`.

Loopback has no bandwidth limit worth the name, so on loopback trimming shows
up as CPU and latency only. With `--link-rate 1gbit` the root -> leaf leg
crosses a veth shaped by a token bucket (tbf) in both directions, so req/s is
measured where bandwidth is the bottleneck. Needs root (CAP_NET_ADMIN), `ip`
and `tc`; `unavailable_reason()` says in one line why not when it cannot run.
Everything created (namespace, veth, qdiscs) is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from . import procs

HOST_IP, LEAF_IP, PREFIX = "10.213.7.1", "10.213.7.2", 30


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=check, stdin=subprocess.DEVNULL)


def leaf_supports_host() -> bool:
    try:
        out = subprocess.run(procs.trimmer_cmd("leaf", "--help"), capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--host" in out


def unavailable_reason() -> str | None:
    """None when a shaped veth can be set up here; else why not, in a few words."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for ip netns / tc; run as root to measure a constrained link"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2)"
    probe = f"trimmer-probe-{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']}"
    _run("ip", "netns", "del", probe, check=False)
    if not leaf_supports_host():
        return "the leaf has no --host option to listen inside the namespace"
    return None


def _burst_bytes(bits_per_s: int) -> int:
    return max(32 * 1024, bits_per_s // 8 // 100)  # >= 10 ms worth at the rate, so tbf accepts it at HZ=100


@contextlib.contextmanager
def shaped_link(bits_per_s: int) -> Iterator[str]:
    """Create namespace + veth shaped to `bits_per_s` each way; yields the namespace name."""
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"trimmer-lt-{tag}", f"tlh{tag}", f"tln{tag}"
    burst = _burst_bytes(bits_per_s)
    shape = ["tbf", "rate", f"{bits_per_s}bit", "burst", str(burst), "latency", "100ms"]
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{LEAF_IP}/{PREFIX}", "dev", ns_if)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("tc", "qdisc", "add", "dev", host_if, "root", *shape)  # root -> leaf
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_if, "root", *shape)  # leaf -> root
        yield ns
    except subprocess.CalledProcessError as exc:
        from trimmer.errors import TrimmerError

        raise TrimmerError(f"link-rate setup failed: {' '.join(exc.cmd)}: {(exc.stderr or '').strip()}") from None
    finally:
        _run("ip", "link", "del", host_if, check=False)
        _run("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def shaped_leaf(repo: Path, bits_per_s: int, log_dir: Path) -> Iterator[tuple[str, int, int]]:
    """A leaf listening on LEAF_IP inside a shaped namespace; yields (host, port, pid)."""
    with shaped_link(bits_per_s) as ns:
        port = procs.free_port()
        cmd = ["ip", "netns", "exec", ns,
               *procs.trimmer_cmd("leaf", "--repo", str(repo), "--host", LEAF_IP, "--port", str(port))]
        leaf = procs.ManagedProcess(f"leaf-{bits_per_s}", cmd, f"http://{LEAF_IP}:{port}",
                                    Path(log_dir) / f"leaf-{bits_per_s}.log")
        leaf.start()
        with procs.running(leaf):
            leaf.wait_ready("/v2/health/ready", 180)
            yield LEAF_IP, port, leaf.pid
