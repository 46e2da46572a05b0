"""Shared fixtures: a real Ray cluster on loopback, started once per test session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray process on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions marker (our cluster's private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def start_head(num_cpus: int = 2) -> tuple[str, str]:
    """`ray start --head` on 127.0.0.1 with its own temp dir; returns (address, temp dir)."""
    tmp = tempfile.mkdtemp(prefix="gnsray-")
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    if not Path(ray_bin).exists():
        ray_bin = shutil.which("ray") or "ray"
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={tmp}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{port}", tmp


def stop_head(tmp: str) -> None:
    """Stop only the processes of this cluster (never a developer's other clusters)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ray_processes(tmp)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if pids:
            time.sleep(1.0)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address():
    """Address of a real 2-CPU Ray cluster on loopback, shared by the session's tests."""
    address, tmp = start_head()
    try:
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_head(tmp)


@pytest.fixture
def cluster(ray_address):
    """A connected Cluster (disconnects, without stopping the cluster, afterwards)."""
    from gns_sweep.runtime import Cluster, ClusterConfig

    with Cluster(ClusterConfig(address=ray_address)) as c:
        yield c
