"""Helpers of tests/serve/test_serve_cli.py and test_two_node.py: tiny engines shared by both, the
CLI as a subprocess, `ray start` nodes in their own process groups, and the TCP ports a process tree
listens on (from /proc: no psutil)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

CLIENT_TIMEOUT_S = 30  # every HTTP call here is bounded


def tiny_engines(tmp_path_factory) -> Path:
    """One bucket (0.64 s, UNet batch 2) of random tiny weights, no text engine; exported once per run."""
    from litefocus.export.build import export_engines
    from litefocus.export.plan import ExportOptions

    out = tmp_path_factory.getbasetemp() / "cluster-engines"
    if not (out / "manifest.json").is_file():
        options = ExportOptions(
            seconds=(0.5,), out=out, model=None, random_preset="tiny", text_len=16, batches=(2,), quiet=True
        )
        export_engines(options)
    return out


def conditioning_body(engines: Path, seed: int) -> dict:
    """A guided request with random conditioning of the engines' widths (row 0 negative, row 1 positive)."""
    manifest = json.loads((engines / "manifest.json").read_text())
    (entry,) = manifest["entries"].values()
    shapes = {i["name"]: i["shape"] for i in entry["modules"]["unet"]["contract"]["inputs"]}
    rng = np.random.default_rng(seed)
    gpt2 = rng.standard_normal(shapes["encoder_hidden_states"]).astype(np.float32)
    t5 = rng.standard_normal(shapes["encoder_hidden_states_1"]).astype(np.float32)
    mask = np.ones(shapes["encoder_attention_mask_1"], np.int64)
    cond = {"gpt2": gpt2.tolist(), "t5": t5.tolist(), "t5_mask": mask.tolist()}
    return {"conditioning": cond, "seconds": 0.5, "steps": 2, "seed": seed, "format": "f32"}


def post(url: str, body: dict, timeout: float = CLIENT_TIMEOUT_S) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, timeout=timeout)


def env(**extra) -> dict:
    """The environment of a child: Ray's servers on loopback, no usage stats, quick node-death checks."""
    out = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out.setdefault("RAY_AUTH_MODE", "token")  # a driver joining a `ray start` cluster sends the token
    out.update({k: str(v) for k, v in extra.items()})
    return out


class Proc:
    """A child in its own process group (so that it and whatever it starts can be killed by its id),
    its stdout and stderr read line by line in a thread."""

    def __init__(self, argv: list[str], environ: dict | None = None):
        self.argv = argv
        self.p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ or env(),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first new line matching ``pattern``; AssertionError past ``timeout`` or at exit."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None:
                raise AssertionError(
                    f"{self.argv[:3]} exited ({self.p.wait()}) before {pattern!r}:\n{self.tail()}"
                )
            if re.search(pattern, line or ""):
                return line
            if time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} within {timeout:g} s:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group past ``timeout``; the exit status of the first."""
        self.signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)  # what it started and left behind
            self.p.wait(10)


def serve_cli(*args: str, environ: dict | None = None) -> Proc:
    return Proc([sys.executable, "-m", "litefocus.serve.cli", *map(str, args)], environ)


def ray_node(*args: str, environ: dict | None = None) -> Proc:
    """``ray start --block ...``: the node lives while this process (group) does."""
    ray = Path(sys.executable).with_name("ray")
    return Proc([str(ray), "start", "--block", "--disable-usage-stats", *args], environ)


# ---- listening sockets of a process tree, from /proc ----------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def process_tree(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += _children(p)
    return seen


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _address(hex_addr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
    ip = ipaddress.ip_address(words)
    return ip, int(port, 16)


def listening(pid: int) -> list[tuple[str, bool, str]]:
    """(ip:port, loopback only?, process name) of each TCP socket ``pid`` or a descendant listens on."""
    owner = {}
    for p in process_tree(pid):
        try:
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        owner.update(dict.fromkeys(_socket_inodes(p), name))
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in owner:  # 0A: LISTEN
                ip, port = _address(cols[1])
                mapped = getattr(ip, "ipv4_mapped", None)
                out.append((f"{ip}:{port}", (mapped or ip).is_loopback, owner[cols[9]]))
    return out
