"""Shared helpers of the benchmark scripts: machine description, timing, memory, tables and the
JSON result files that run_all.py turns into RESULTS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import fcntl
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent


def _cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall seconds, machine busy CPU-seconds, steal CPU-seconds, this process's and its
    waited-for children's CPU-seconds)."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        values = [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return time.monotonic(), (user + nice + system + irq + softirq) / ticks, steal / ticks, own


_START = _cpu_snapshot()
LOCK = Path("/tmp/esmm-cpu.lock")


def lock_held_elsewhere() -> bool | None:
    """True when another open file description holds the team's CPU lock (the documented
    ``flock /tmp/esmm-cpu.lock ...`` wrapper around this run); None without a lock file."""
    if not LOCK.exists():
        return None
    with open(LOCK) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


_LOCK_AT_START = lock_held_elsewhere()


def cpu_accounting() -> dict:
    """CPU used on the machine by other processes (and stolen by the hypervisor) since this
    script started: a check that the figures were not taken on a busy machine."""
    now = _cpu_snapshot()
    wall = now[0] - _START[0]
    others = max(0.0, (now[1] - _START[1]) - (now[3] - _START[3]))
    return {
        "wall_seconds": wall,
        "own_cpu_seconds": now[3] - _START[3],
        "other_processes_cpu_seconds": others,
        "other_processes_share_of_machine": others / (wall * (os.cpu_count() or 1)),
        "steal_cpu_seconds": now[2] - _START[2],
        "loadavg_at_end": os.getloadavg(),
    }


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has; ``doc`` is the script's
    docstring (first paragraph: description, the rest: epilog)."""
    description, _, epilog = doc.partition("\n\n")
    p = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run of seconds, not a measurement"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="result JSON file (default: benchmarks/results/<script>.json; --quick runs write "
        "<script>.quick.json so they never replace a measurement)",
    )
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    """What the figures were measured on."""
    import numpy as np
    import pyarrow as pa
    import torch

    flags = cpu_flags()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "memory_bytes": mem_total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def command_line() -> str:
    """The command that produced this run, relative to the repository root."""
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.relative_to(REPO_ROOT))
    except ValueError:
        exe_text = str(exe)
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = sys.argv[0]
    return shlex.join([exe_text, script_text, *sys.argv[1:]])


def write_result(name: str, args: argparse.Namespace, payload: dict) -> Path:
    """benchmarks/results/<name>.json (or <name>.quick.json) with machine, command and date."""
    path = args.output or RESULTS_DIR / (f"{name}.quick.json" if args.quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "quick": bool(args.quick),
        "machine": machine_info(),
        "cpu_accounting": cpu_accounting(),
        "cpu_lock_held": _LOCK_AT_START,
        **payload,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    load = record["cpu_accounting"]
    print(
        f"\nother processes used {load['other_processes_cpu_seconds']:.1f} CPU-s during the "
        f"{load['wall_seconds']:.0f} s run ({100 * load['other_processes_share_of_machine']:.1f}% "
        f"of the machine); steal {load['steal_cpu_seconds']:.1f} s"
    )
    print(f"result written to {_shown(path)}")
    return path


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset_peak_rss() (or process start)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux clear_refs 5); False where
    unsupported, in which case peak figures are peaks since process start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """A plain aligned table on stdout (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    if title:
        print(f"\n{title}")

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(fmt(row))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def verdict(measured: float, target: float) -> str:
    return "pass" if measured >= target else "MISS"
