"""Device, dtype and thread policy. The only module that names accelerator back-ends."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

__all__ = [
    "resolve_device",
    "synchronize",
    "autocast",
    "set_threads",
    "limit_heap_fragmentation",
    "trim_heap",
    "heap_trimming",
    "reuse_large_allocations",
    "peak_memory_bytes",
    "reset_peak_memory",
    "current_rss_bytes",
    "available_memory_bytes",
    "cgroup_available_bytes",
    "parse_dtype",
    "choose_compute_dtype",
    "cpu_has_native_bf16",
    "bf16_speedup",
    "AUTO_DTYPE_ENV",
    "auto_dtype_override",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' -> torch.bfloat16; None and 'none' -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key in ("none", "off", "no"):
        return None
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)} or 'none'")
    return _DTYPES[key]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks the first accelerator present, else the CPU."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available; use --device cpu")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so timed regions measure real work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed-precision compute with fp32 master weights; a no-op when dtype is None or float32."""
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def set_threads(n: int | None) -> None:
    """Set torch's intra-op threads (None leaves torch's default)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


_LIBC: list = []
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _libc():
    """glibc, when this process runs on it (for ``mallopt`` and ``malloc_trim``); None elsewhere."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _LIBC.append(lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None)
    return _LIBC[0]


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """Serve host allocations of at least ``threshold`` bytes from their own memory maps (glibc ``mallopt``), so
    that freeing one gives its memory back to the system at once.

    By default glibc raises this threshold as large blocks are freed (up to 32 MiB), and the per-layer weight and
    activation tensors of a training step then come from the heap, whose freed holes are not returned: on the
    ~1.1B-parameter offload benchmark the peak RSS was 0.9 GiB higher for that alone (docs/RESULTS.md). Used by
    ``--offload disk``, the memory-first mode. Returns False where it does not apply (not glibc)."""
    lib = _libc()
    return lib is not None and bool(lib.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


_TRIM = {"level": 0, "on": False}
TRIM_GROWTH_BYTES = 256 << 20


def trim_heap() -> None:
    """Hand the free pages of the host heap back to the system (glibc ``malloc_trim``; a no-op elsewhere) when the
    process has grown by more than ``TRIM_GROWTH_BYTES`` over the level at which it last trimmed.

    Called between training steps and mini-batches, when the tensors of one are freed: without it the holes they
    leave in glibc's heap add up over a run (docs/RESULTS.md, "Memory"). The level is the size *before* the last
    trim, so a step whose working set is simply allocated again does not trim again: pages handed back fault in
    anew when reused, and trimming at every step made `make demo` ~18% slower."""
    lib = _libc() if _TRIM["on"] else None
    if lib is None:
        return
    rss = current_rss_bytes()
    if not _TRIM["level"]:
        _TRIM["level"] = rss
    if rss - _TRIM["level"] < TRIM_GROWTH_BYTES:
        return
    lib.malloc_trim(0)
    _TRIM["level"] = rss


@contextlib.contextmanager
def heap_trimming(on: bool) -> Iterator[None]:
    """:func:`trim_heap` active inside the context (compress turns it on for memory-bound runs only: on the small
    demo it cost ~11% of the compression time and the demo does not need the memory)."""
    old = dict(_TRIM)
    _TRIM.update(on=bool(on), level=0)
    try:
        yield
    finally:
        _TRIM.update(old)


# the defaults that reuse_large_allocations restores
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_REUSE = {"depth": 0}


@contextlib.contextmanager
def reuse_large_allocations(on: bool) -> Iterator[bool]:
    """Inside the context, large host allocations come from the heap and go back to it when freed (glibc: no
    memory maps, no trimming of the heap's top), so the next one reuses pages that are already mapped.

    glibc maps every allocation above its largest mmap threshold (32 MiB) afresh and unmaps it on free, and the
    kernel zero-fills each 4 KiB page of it at first touch: the final stage's [chunk, V] logits (96 MiB per chunk
    for SmolLM2's 49k vocabulary, 512 MiB for Gemma-3's 262k) cost one page fault per page, 4-5 times per chunk
    and step. ``benchmarks/logit_chunk.py`` took 1.66 s per mini-batch that way and 1.06 s with the heap reused
    (docs/RESULTS.md). The price is memory: freed heap pages stay with the process until the context ends (then
    they are trimmed), so compress turns this on only for runs that are not memory-bound (the opposite of
    :func:`heap_trimming`). Yields whether it applies (False off, or where the C library is not glibc)."""
    lib = _libc() if on else None
    if lib is None:
        yield False
        return
    if _REUSE["depth"] == 0:
        lib.mallopt(_M_MMAP_MAX, 0)
        lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: 2 GiB of free top before a trim
    _REUSE["depth"] += 1
    try:
        yield True
    finally:
        _REUSE["depth"] -= 1
        if _REUSE["depth"] == 0:  # the outermost context restores glibc's defaults
            lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            lib.malloc_trim(0)


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a run can still take on ``device``: free accelerator memory (CUDA), or on the CPU the kernel's
    MemAvailable (Linux /proc/meminfo) and, when this process's control group has a memory limit (a container),
    what that limit still allows if it is less; None where neither can be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    host = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    group = cgroup_available_bytes()
    return host if group is None else group if host is None else min(host, group)


def cgroup_available_bytes(root: str | os.PathLike = "/sys/fs/cgroup",
                           proc: str | os.PathLike = "/proc/self/cgroup") -> int | None:
    """Memory this process's control group can still take before its limit (containers, batch-job slices), the
    tightest of the group and its ancestors: limit - (usage - inactive file cache, which the kernel reclaims first).
    cgroup v2 (``memory.max``, ``memory.current``, ``inactive_file``) or v1 (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``, ``total_inactive_file``); None without a limit or where it cannot be read. The
    kernel's MemAvailable sees the host's memory, not a container's limit."""
    root = Path(root)
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        rel = Path(path.lstrip("/"))
        # the group and every ancestor (a namespaced container sees its own group as the root)
        for d in [base / rel, *[base / p for p in rel.parents]]:
            got = _cgroup_room(d, *files)
            if got is not None:
                best = got if best is None else min(best, got)
    return best


def _cgroup_room(d: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        raw = (d / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= 1 << 60:  # no limit (v1 writes a page-rounded 2^63 - 1)
            return None
        limit, usage = int(raw), int((d / usage_file).read_text().strip())
        inactive = 0
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
                break
    except (OSError, ValueError):
        return None
    return max(0, limit - max(0, usage - inactive))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Measured dense matmul throughput (FLOP/s) for n x n operands: one uncounted warm-up, then the fastest of
    ``repeats`` runs (the peak: one undisturbed run suffices).

    The fraction of peak that a run reports is divided by this number, so a momentary slowdown must not lower it
    (compress takes the fastest of 10). It is still the rate of the moment: on a 2-core VM whose rate moved
    between ~145 and ~240 GFLOP/s from minute to minute (docs/RESULTS.md), no short measurement is the rate of a
    whole run."""
    import time

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


AUTO_DTYPE_ENV = "FUSEGPT_AUTO_DTYPE"


def auto_dtype_override() -> str | None:
    """``fp32`` or ``bf16`` when ``FUSEGPT_AUTO_DTYPE`` forces what ``auto`` means, else None; other values are
    refused."""
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip().lower()
    if forced and forced not in ("fp32", "bf16"):
        raise ValueError(f"{AUTO_DTYPE_ENV}={forced!r}: use fp32 or bf16 (or unset it to measure)")
    return forced or None


def choose_compute_dtype(device: torch.device, requested: str) -> torch.dtype | None:
    """'fp32' -> None (no autocast); 'bf16'/'fp16' as asked; 'auto' -> on a CPU, fp32 where its feature flags show
    no bf16 instructions (such CPUs run bf16 4-80x slower), else bf16 only where a measured matmul runs at least
    1.3x faster than fp32 (:func:`bf16_speedup`).

    The environment variable ``FUSEGPT_AUTO_DTYPE`` (``fp32`` or ``bf16``) forces what ``auto`` resolves to, so a
    test suite (or a user) gets the same arithmetic on every machine; it never overrides an explicit request.
    """
    if requested != "auto":
        dt = parse_dtype(requested)
        return None if dt == torch.float32 else dt
    forced = auto_dtype_override()
    if forced:
        return None if forced == "fp32" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    if cpu_has_native_bf16() is False:  # the flags say no bf16 instructions: never faster, do not measure
        return None
    return torch.bfloat16 if bf16_speedup(device) >= 1.3 else None


# CPU feature flags of bf16 matmul instructions: x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16, /proc/cpuinfo "bf16")
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU's feature flags (Linux ``/proc/cpuinfo``: x86 ``flags``, Arm ``Features``) name bf16 matmul
    instructions; None where no flags can be read (another OS), and ``auto`` then decides by measurement alone."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.lower().split())
    return bool(flags & _BF16_FLAGS) if flags else None


def bf16_speedup(device: torch.device, n: int = 512, rounds: int = 3) -> float:
    """bf16 matmul throughput over fp32's: the fastest of each over ``rounds`` interleaved measurements (fp32, bf16,
    fp32, bf16, ...), so that a slow moment of the machine cannot fall on one dtype only. A single fp32 reading
    taken in such a moment once made ``auto`` pick bf16 on a CPU where it runs 4x slower (docs/RESULTS.md)."""
    best = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_flops_per_second(device, dtype, n=n, repeats=3))
    return best[torch.bfloat16] / best[torch.float32]
