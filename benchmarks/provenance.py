"""Which code a benchmark run measured, for the headers of benchmarks/RESULTS.md."""

import os
import platform
import subprocess
from pathlib import Path


def code_version() -> str:
    """'code at <short commit>' (plus ' with local changes'), or '' outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # The results files are excluded: a benchmark appends to them as it runs.
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", "tfjax", "benchmarks",
            ":!benchmarks/RESULTS.md", ":!benchmarks/QUALITY.md",
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"code at {commit}" + (" with local changes" if dirty else "")


def machine() -> str:
    """'x86_64, 2 cores, AVX-512': the architecture, core count and widest vector ISA
    (plus AMX when the CPU has Intel's matrix unit), and XLA_FLAGS when set: a table measured
    under other compiler flags says so."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    flags = set(line.split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "ISA unknown"
    if "amx_tile" in flags:
        isa += " + AMX"
    where = f"{platform.machine()}, {os.cpu_count()} cores, {isa}"
    xla_flags = os.environ.get("XLA_FLAGS", "").strip()
    return where + (f", XLA_FLAGS='{xla_flags}'" if xla_flags else "")
