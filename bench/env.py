"""Required tools (nginx, curl, wrk; installed with apt-get when missing and we are root) and the
description of the machine and software that goes at the top of every report."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

APT_PACKAGES = {"nginx": "nginx-light", "curl": "curl", "wrk": "wrk"}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tools:
    nginx: str
    curl: str
    wrk: str


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _locate() -> dict[str, str | None]:
    return {name: find_tool(name) for name in APT_PACKAGES}


def ensure_tools() -> Tools | str:
    """The tools, installing missing ones with apt-get as root; else what to install."""
    found = _locate()
    missing = [name for name, path in found.items() if path is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = [APT_PACKAGES[name] for name in missing]
        print(f"bench: installing {' '.join(packages)} with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            try:
                subprocess.run(argv, env=env, check=False, timeout=900)
            except subprocess.TimeoutExpired:
                break
        found = _locate()
        missing = [name for name, path in found.items() if path is None]
    if missing:
        wanted = " ".join(APT_PACKAGES[name] for name in missing)
        return (
            f"bench: missing {', '.join(missing)}; install them "
            f"(Debian/Ubuntu: apt-get install -y {wanted}) or run as root to let bench do it"
        )
    nginx, curl, wrk = (found[name] for name in ("nginx", "curl", "wrk"))
    assert nginx and curl and wrk
    return Tools(nginx=nginx, curl=curl, wrk=wrk)


def missing_python_packages() -> list[str]:
    return [name for name in ("trustme", "trio", "h11") if importlib.util.find_spec(name) is None]


def _first_line(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (proc.stdout or proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")


def source_fingerprint() -> str:
    """sha256 (12 hex) over hubproxy's source files: hubproxy restarts during a run, so a change
    to its source mid-run would mix two versions in one table."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "hubproxy").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def describe(tools: Tools) -> dict[str, str]:
    """Machine and software, as ``label -> value`` in report order."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} online, {affinity} usable by this process",
        "memory": f"{mem_total_gib():.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()} "
        f"({sys.executable})",
        "trio": _version("trio"),
        "h11": _version("h11"),
        "OpenSSL (Python)": ssl.OPENSSL_VERSION,
        "hubproxy": f"{_first_line([sys.executable, '-m', 'hubproxy', '--version'], REPO_ROOT)}"
        f" (git {git_revision()}, source sha256 {source_fingerprint()})",
        "nginx": _first_line([tools.nginx, "-v"]),
        "curl": _first_line([tools.curl, "--version"]),
        "wrk": _first_line([tools.wrk, "--version"]),
        "load average at start": loadavg(),
    }
