"""Shared helpers of the benchmark scripts: interleaved timing (A B A B ...), medians and ratio spreads, peak
memory of this process, JSON output."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, interleaved (A B C A B C ...), after ``warmup`` rounds. Seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> dict[str, float]:
    """median, quartiles (q1, q3: the inclusive method, so a handful of samples works) and range."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """:func:`spread` of the per-round ratios num[i] / den[i] (each pair measured side by side)."""
    if len(num) != len(den) or not num:
        raise ValueError("paired_ratios needs two equally long, non-empty lists")
    return spread([a / b for a, b in zip(num, den)])


def rotated_rounds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                   device: torch.device = torch.device("cpu")) -> dict[str, dict[str, list[float]]]:
    """Like :func:`interleaved`, but round ``i`` starts at the ``i``-th function (A B C, B C A, C A B, ...), so no
    variant always runs right after the same one (caches, allocator state, thermal drift).

    Returns ``{"wall": {name: seconds}, "cpu": {name: seconds}}``: wall-clock time, and the CPU time of this
    process (all its threads; on a shared machine it leaves out the time spent waiting for a core); on CUDA
    also ``"gpu"``: the time between CUDA events recorded on the stream before and after each call."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    gpu: dict[str, list[float]] = {k: [] for k in fns}
    cuda = device.type == "cuda"
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            if cuda:
                end.record()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if cuda:
                gpu[name].append(start.elapsed_time(end) / 1000.0)
    return {"wall": wall, "cpu": cpu, **({"gpu": gpu} if cuda else {})}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mib() -> float:
    """Resident set size of this process now (Linux), MiB."""
    return _proc_status_kib("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``), so RSS counts live memory only;
    a no-op where glibc is not available."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mib() -> float:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss`, MiB."""
    return _proc_status_kib("VmHWM") / 1024


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
