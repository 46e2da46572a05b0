"""A real two-node Ray cluster for tests: one node per network namespace, joined by a veth link.

The set-up is clusters/two-node-netns.sh (which a user can run by hand, see docs/cluster.md);
this module drives it from pytest and runs drivers inside the head's namespace. Nothing is
reachable beyond the two namespaces: they have no route past their own /30.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "clusters" / "two-node-netns.sh"
TIMEOUT = 240  # seconds for any one command: a hang fails the test instead of the suite


def why_not() -> str | None:
    """Why this machine cannot make network namespaces (the reason to skip), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"gnsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def ray_bin() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


@dataclass(frozen=True)
class TwoNodes:
    """A running cluster made by the script: its state folder and what cluster.env says."""

    state: Path  # the script's STATE_DIR
    info: Mapping[str, str]  # cluster.env: HEAD_ADDRESS, NS_HEAD, NS_WORKER, AUTH_MODE, TOKEN_PATH, ...

    @property
    def address(self) -> str:
        return self.info["HEAD_ADDRESS"]

    def command(
        self, argv: Sequence[str], *, node: str = "head", env: Mapping[str, str] = {}, unset: Sequence[str] = ()
    ) -> list[str]:
        """argv run inside a node's namespace with the cluster's Ray environment, changed by env/unset."""
        extra = [arg for k in unset for arg in ("-u", k)] + [f"{k}={v}" for k, v in env.items()]
        return [str(SCRIPT), "exec", str(self.state), node, "env", *extra, *argv]

    def cli(self, *args: str, **kw) -> list[str]:
        """A gns-sweep command as a driver on the head node (add --address self.address yourself)."""
        return self.command([sys.executable, "-m", "gns_sweep_cli", *args], **kw)

    def run(self, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, check=False)

    def node_id(self, node: str) -> str:
        return _script("node-id", str(self.state), node).stdout.strip()

    def pids(self, node: str) -> list[int]:
        ns = self.info["NS_HEAD" if node == "head" else "NS_WORKER"]
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def task_pids(self, node: str) -> list[int]:
        """Ray workers of a node that are running a gns-sweep task right now (Ray titles them so)."""
        return [p for p in self.pids(node) if _cmdline(p).startswith("ray::_run_on_worker")]

    def kill_worker_node(self) -> None:
        _script("kill-worker", str(self.state))


@contextlib.contextmanager
def two_nodes(*, token: bool, worker_gpus: int = 0, env: Mapping[str, str] = {}) -> Iterator[TwoNodes]:
    """Up for the duration; down (every process of both namespaces, then the namespaces) afterwards.
    Skips the test, with the reason, where namespaces cannot be made."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="gns2n-"))  # short: Ray's socket paths live under it
    flags = ["--token"] if token else []
    try:
        _script("up", str(state), *flags, "--worker-gpus", str(worker_gpus), env=env)
        info = dict(line.split("=", 1) for line in (state / "cluster.env").read_text().split())
        yield TwoNodes(state, info)
    finally:
        if (state / "cluster.env").exists():
            _script("down", str(state), check=False)
        shutil.rmtree(state, ignore_errors=True)


def _script(*args: str, env: Mapping[str, str] = {}, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(SCRIPT), *args],
        env={**os.environ, "RAY": ray_bin(), **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if check and done.returncode != 0:
        logs = [Path(args[1]) / f"{node}.log" for node in ("head", "worker")]
        tails = " | ".join(p.read_text()[-1500:] for p in logs if p.exists())
        raise RuntimeError(f"{SCRIPT.name} {args[0]} failed ({done.returncode}): {done.stderr[-1500:]} {tails}")
    return done


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
