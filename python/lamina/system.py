"""What this machine has and what lamina uses of it: CPUs, memory, backends, devices."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core, _native
from ._core import PACKAGE_DIR
from .addons import AddOn

# x86 /proc/cpuinfo flags -> ggml's names for the same features
_X86_FLAGS = {
    "sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2",
    "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "amx_tile": "AMX_TILE",
    "amx_int8": "AMX_INT8", "amx_bf16": "AMX_BF16",
}


@dataclass(frozen=True)
class Device:
    """One device of a loaded ggml backend."""

    index: int
    name: str
    description: str
    backend: str
    kind: str  # cpu, gpu, igpu, accel, remote
    memory_free: int | None  # None when listed with memory=False
    memory_total: int | None


def devices(memory: bool = True) -> list[Device]:
    """Every device llama.cpp's loaded backends expose, in ggml's order (CPU included).

    ``memory=True`` asks each device for its free and total memory, which opens it: on a CUDA
    device that creates the CUDA context (several hundred MiB of GPU memory held by this process
    from then on) and on a remote device it is a round trip to the server. ``memory=False`` lists
    the devices without opening any (``memory_free``/``memory_total`` are then None); ``Model``
    lists them so and asks only the devices it uses.
    """
    return [Device(d["index"], d["name"], d["description"], d["backend"],
                   "remote" if d["backend"].upper() == "RPC" else d["type"], d["memory_free"], d["memory_total"])
            for d in _native.devices(memory)]


def rpc_connect(endpoint: str, timeout: float = 3.0) -> list[Device]:
    """Register the devices of a ggml RPC server ("host:port"; start one with ``lamina rpc-server``).

    They appear in devices() with kind "remote" and take offloaded layers like any GPU (a Model
    uses them when its ``rpc`` or ``devices`` names them). Raises ConnectionError naming the
    endpoint when nothing answers within ``timeout`` seconds, or when the server speaks another
    RPC protocol version (checked with ggml's own HELLO before ggml connects: ggml would abort).
    A server that goes away later makes the decode using it raise DecodeError, and the models
    holding layers there are closed (lamina's patch to ggml's RPC client, which aborted).
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"RPC endpoint must be 'host:port', got {endpoint!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    indices = set(_native.rpc_add_server(endpoint, max(1, int(timeout * 1000))))
    # with their memory (a server that went away earlier is not asked: ggml would abort reconnecting)
    return [d for d in devices() if d.index in indices]


def addons() -> list[AddOn]:
    """The GPU add-ons installed (lamina-cuda12, lamina-cuda13, lamina-vulkan, ...): each loaded at
    import, or not, with the reason."""
    return list(_core.ADDONS)


def gpu_absent_reason() -> str:
    """Why this process has no GPU device to offload to, in words a user can act on ("" when it has one)."""
    failed = [a for a in _core.ADDONS if not a.loaded]
    if failed:
        return "; ".join(f"GPU add-on {a.distribution} did not load: {a.error}" for a in failed)
    if any(d.kind in ("gpu", "igpu") for d in devices(memory=False)):
        return ""
    empty = [b["name"] for b in _native.backends() if b["n_devices"] == 0 and
             b["name"].upper() not in ("CPU", "BLAS") and not b["name"].upper().startswith("RPC")]
    if empty:
        return f"the {', '.join(empty)} backend found no device"
    remote = [f"{d.name} ({d.description})" for d in devices(memory=False) if d.kind == "remote"]
    if remote:
        return (f"no local GPU, and no RPC server named in rpc= or devices= (connected: {', '.join(remote)}; "
                "a model uses only the servers it names)")
    if _native.BACKEND_DL:
        return ("no GPU backend is installed: this lamina carries the CPU backend only "
                "(pip install \"lamina[cuda13]\", \"lamina[cuda12]\" or \"lamina[vulkan]\" adds one)")
    return ("this lamina was built without a GPU backend (build it with -Ccmake.define.GGML_CUDA=ON or "
            "GGML_VULKAN=ON: see the README)")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return cpus


def allowed_cpus() -> list[int]:
    """Logical CPUs this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class CgroupLevel:
    """One cgroup on the path from this process's cgroup up to the root, with its own limits."""

    version: int  # 1 or 2
    path: str  # the cgroup's path ("/" is the root of the hierarchy as mounted here)
    cpu_limit: float | None  # CPUs its quota grants (quota / period), None when unlimited
    memory_limit: int | None  # bytes, None when unlimited


_UNLIMITED_BYTES = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs and backslashes are written as octal escapes."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def _mounts(mountinfo: str) -> list[tuple[str, str, str, str, str]]:
    """(root, mount point, fs type, source, super options) of each line of /proc/self/mountinfo."""
    out = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        f, g = pre.split(), post.split()
        if sep and len(f) >= 5 and len(g) >= 2:
            out.append((_unescape(f[3]), _unescape(f[4]), g[0], g[1], g[2] if len(g) > 2 else ""))
    return out


def _cgroup_dirs(controller: str, proc_cgroup: str, mountinfo: str) -> tuple[int, list[tuple[str, str]]]:
    """(version, [(cgroup path, directory)]) from this process's cgroup up to the mount's root, for a
    v1 controller ("cpu", "memory") or the v2 unified hierarchy; (0, []) when neither is mounted."""
    mounts = _mounts(mountinfo)
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            version, mount = 2, next((m for m in mounts if m[2] == "cgroup2"), None)
        elif controller in ctrls.split(","):
            version = 1
            mount = next((m for m in mounts if m[2] == "cgroup" and controller in m[4].split(",")), None)
        else:
            continue
        if mount is None:
            continue
        root, point = mount[0], mount[1]
        # a path outside the mount's root is a namespaced cgroup path: only the mount's own directory is visible
        rel = path if root == "/" else path[len(root):] if path.startswith(root) else "/"
        parts = [p for p in rel.split("/") if p]
        dirs = []
        for i in range(len(parts), -1, -1):
            sub = "/".join(parts[:i])
            directory = f"{point}/{sub}" if sub else point
            if os.path.isdir(directory):
                dirs.append(("/" + "/".join(parts[:i]), directory))
        if dirs and (version == 1 or controller in (_read(f"{point}/cgroup.controllers") or "").split()):
            return version, dirs
    return 0, []


def _cpu_quota(version: int, directory: str) -> float | None:
    if version == 2:
        text = _read(f"{directory}/cpu.max")
        if text:
            quota, _, period = text.strip().partition(" ")
            if quota != "max" and period:
                return int(quota) / int(period)
        return None
    q, p = _read(f"{directory}/cpu.cfs_quota_us"), _read(f"{directory}/cpu.cfs_period_us")
    if q and p and int(q) > 0 and int(p) > 0:
        return int(q) / int(p)
    return None


def _memory_max(version: int, directory: str) -> int | None:
    text = _read(f"{directory}/{'memory.max' if version == 2 else 'memory.limit_in_bytes'}")
    if not text or text.strip() == "max":
        return None
    n = int(text.strip())
    return None if n >= _UNLIMITED_BYTES else n


def cgroup_levels() -> list[CgroupLevel]:
    """Every cgroup from this process's own up to the root, each with its CPU quota and memory
    limit (the effective limit is the smallest along the path: a parent's quota binds its children)."""
    proc, mountinfo = _read("/proc/self/cgroup") or "", _read("/proc/self/mountinfo") or ""
    cpu_v, cpu_dirs = _cgroup_dirs("cpu", proc, mountinfo)
    mem_v, mem_dirs = _cgroup_dirs("memory", proc, mountinfo)
    levels: dict[str, CgroupLevel] = {}
    for path, d in cpu_dirs:
        levels[path] = CgroupLevel(cpu_v, path, _cpu_quota(cpu_v, d), None)
    for path, d in mem_dirs:
        prev = levels.get(path)
        levels[path] = CgroupLevel(mem_v, path, prev.cpu_limit if prev else None, _memory_max(mem_v, d))
    return sorted(levels.values(), key=lambda lv: -len([p for p in lv.path.split("/") if p]))  # leaf first


def cgroup_cpu_limit() -> float | None:
    """CPUs granted by the cgroup v2 / v1 quota (the smallest along this process's cgroup path),
    or None when unlimited."""
    return min((lv.cpu_limit for lv in cgroup_levels() if lv.cpu_limit is not None), default=None)


def busy_cpus(seconds: float = 0.25) -> dict[int, float]:
    """The share of each allowed CPU's time that went to work over ``seconds`` (/proc/stat; this
    process counts too, so call it while the process is idle). Empty where /proc/stat is unreadable."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for line in (_read("/proc/stat") or "").splitlines():
            name, *fields = line.split()
            if name[:3] == "cpu" and name[3:].isdigit():
                v = [int(x) for x in fields[:8]]
                out[int(name[3:])] = (v[3] + v[4], sum(v))  # (idle + iowait, all) jiffies
        return out
    before = sample()
    time.sleep(seconds)
    after = sample()
    return {c: 1 - (after[c][0] - before[c][0]) / (after[c][1] - before[c][1])
            for c in allowed_cpus() if c in before and c in after and after[c][1] > before[c][1]}


def gpu_processes() -> list[str]:
    """Other processes that hold a CUDA context on this machine's GPUs ("pid name MiB", from
    nvidia-smi; empty without it)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.count(",") == 2]
    return [f"{pid} {name} {mib} MiB" for pid, name, mib in rows if pid != str(os.getpid())]


def cgroup_memory_limit() -> int | None:
    """Bytes the cgroup lets this process use (the smallest limit on its path), or None."""
    return min((lv.memory_limit for lv in cgroup_levels() if lv.memory_limit is not None), default=None)


def performance_cpus(cpus: list[int]) -> list[int]:
    """On hybrid Intel CPUs the performance cores among ``cpus``; otherwise ``cpus``."""
    text = _read("/sys/devices/cpu_core/cpus")
    perf = _parse_cpu_list(text) if text else set()
    return [c for c in cpus if c in perf] or cpus


def physical_cores(cpus: list[int]) -> int:
    """Distinct physical cores among logical ``cpus`` (SMT siblings count once)."""
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology"
        core, pkg = _read(f"{base}/core_id"), _read(f"{base}/physical_package_id")
        cores.add((pkg.strip() if pkg else "0", core.strip() if core else str(c)))
    return max(1, len(cores))


def _within_quota(n: int) -> int:
    limit = cgroup_cpu_limit()
    return n if limit is None else min(n, max(1, math.ceil(limit)))


def default_threads() -> int:
    """Generation threads: physical (performance) cores this process may use, within its cgroup quota."""
    return _within_quota(physical_cores(performance_cpus(allowed_cpus())))


def default_threads_batch() -> int:
    """Prompt-processing threads: every logical CPU this process may use, within its cgroup quota."""
    return _within_quota(len(allowed_cpus()))


def _cpuinfo(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line that starts with one of ``keys`` ("" if none)."""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith(keys):
            return line.split(":", 1)[1].strip()
    return ""


def _meminfo(total: str, free: str) -> tuple[int, int]:
    """Two /proc/meminfo values in bytes (0 where missing)."""
    info = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and key in (total, free):
            info[key] = int(parts[0]) * 1024
    return info.get(total, 0), info.get(free, 0)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory, from /proc/meminfo."""
    return _meminfo("MemTotal", "MemAvailable")


def swap_memory() -> tuple[int, int]:
    """(total, free) bytes of swap, from /proc/meminfo."""
    return _meminfo("SwapTotal", "SwapFree")


def available_memory(available: int) -> int:
    """``available`` bytes of host memory within the cgroup's memory limit."""
    limit = cgroup_memory_limit()
    return min(available, limit) if limit is not None else available


def cache_sizes() -> dict[str, int]:
    """CPU caches of cpu0 in bytes: {"L1d", "L1i", "L2", "L3"} as the kernel lists them."""
    out: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.is_dir() else []:
        level, kind, size = (_read(str(idx / n)) for n in ("level", "type", "size"))
        if not (level and kind and size):
            continue
        size = size.strip()
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1:], 1)
        try:
            n = int(size.rstrip("KMG")) * mult
        except ValueError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind.strip(), "")
        out[f"L{level.strip()}{suffix}"] = n
    return out


# file systems whose reads go over a network (or a VM's host share): mmap'd weights page in slowly
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "gpfs", "beegfs",
    "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs", "fuse.ceph", "fuse.juicefs",
})
# file systems held in memory, whose pages go to swap under pressure
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem_of(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(fs type, mount point, source) of the mount holding ``path`` (("", "", "") when unknown)."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] = ("", "", "")
    for _, point, fstype, source, _ in _mounts(_read("/proc/self/mountinfo") or ""):
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[1]):
            best = (fstype, point, source)
    return best


@dataclass(frozen=True)
class Bandwidth:
    """memory_bandwidth(): GB/s (1e9 bytes/s) read and copied by ``threads`` threads over ``bytes``."""

    read_gbs: float  # sum of uint64 words over the buffer
    copy_gbs: float  # memcpy, counted as bytes read + bytes written (the STREAM convention)
    bytes: int
    threads: int
    seconds: float


def memory_bandwidth(seconds: float = 1.0, threads: int | None = None, size: int | None = None) -> Bandwidth:
    """Measure memory bandwidth natively for about ``seconds`` (half read, half copy).

    threads: default the physical cores this process may use (default_threads()). size: the buffer,
    default 8x the last-level cache, at least 256 MiB, at most 1 GiB and a quarter of available memory.
    Raises MemoryError when the buffer cannot be allocated.
    """
    n = default_threads() if threads is None else threads
    if size is None:
        llc = max(cache_sizes().values(), default=32 * 1024 ** 2)
        size = min(max(8 * llc, 256 * 1024 ** 2), 1024 ** 3)
        avail = available_memory(host_memory()[1])
        if avail:
            size = max(16 * 1024 ** 2, min(size, avail // 4))
    d = _native.memory_bandwidth(size, n, seconds)
    return Bandwidth(float(d["read_gbs"]), float(d["copy_gbs"]), int(d["bytes"]), int(d["threads"]),
                     float(d["seconds"]))


@dataclass(frozen=True)
class SystemInfo:
    """lamina.system_info(): what is present, what was compiled, what is in use."""

    lamina_version: str
    llama_cpp: dict[str, Any]
    backends: list[dict[str, Any]]
    devices: list[Device]
    cpu_model: str
    cpu_features_present: list[str]
    cpu_features_compiled: dict[str, str]
    cpu_variant: str
    logical_cpus: int
    allowed_cpus: list[int]
    physical_cores: int
    cgroup_cpu_limit: float | None
    default_threads: int
    default_threads_batch: int
    memory_total: int
    memory_available: int
    supports: dict[str, Any] = field(default_factory=dict)
    addons: list[AddOn] = field(default_factory=list)

    def __str__(self) -> str:
        gib = 1024 ** 3
        lines = [
            f"lamina {self.lamina_version}  llama.cpp {self.llama_cpp['version']} ({self.llama_cpp['commit']}, "
            f"{self.llama_cpp['source']}{', portable' if self.llama_cpp['portable'] else ''})",
            f"cpu: {self.cpu_model or 'unknown'}; {self.logical_cpus} logical, {len(self.allowed_cpus)} allowed, "
            f"{self.physical_cores} physical cores"
            + (f", cgroup limit {self.cgroup_cpu_limit:g}" if self.cgroup_cpu_limit else ""),
            f"threads: {self.default_threads} for generation (physical cores available), "
            f"{self.default_threads_batch} for batches (logical CPUs available)",
            f"cpu features present: {' '.join(self.cpu_features_present) or '-'}",
            f"cpu backend in use: {self.cpu_variant}; compiled for: "
            + (" ".join(k for k, v in self.cpu_features_compiled.items() if v == "1") or "-"),
            f"memory: {self.memory_total / gib:.1f} GiB total, {self.memory_available / gib:.1f} GiB available",
            "backends: " + ", ".join(f"{b['name']} ({b['n_devices']} device{'s' if b['n_devices'] != 1 else ''})"
                                     for b in self.backends),
        ]
        lines += [f"add-on: {a}" for a in self.addons]
        if not any(d.kind in ("gpu", "igpu") for d in self.devices):
            lines.append(f"gpu: none: {gpu_absent_reason()}")
        for d in self.devices:
            mem = "" if d.memory_free is None or d.memory_total is None else \
                f", {d.memory_free / gib:.1f}/{d.memory_total / gib:.1f} GiB free"
            lines.append(f"  device {d.index}: {d.name} [{d.backend}, {d.kind}] {d.description}{mem}")
        return "\n".join(lines)


def system_info() -> SystemInfo:
    """CPU features present / compiled / in use, cores, memory, backends and devices."""
    backends = _native.backends()
    cpu: dict[str, Any] = next((b for b in backends if b["name"].upper() == "CPU"), {"features": {}})
    flags = set(_cpuinfo("flags", "Features").split())
    present = sorted({name for flag, name in _X86_FLAGS.items() if flag in flags})
    variant = "native build (-march=native)"
    if _native.PORTABLE:  # which libggml-cpu-<variant>.so ggml picked for this CPU
        maps = _read("/proc/self/maps") or ""
        loaded = {ln.rsplit("/", 1)[-1] for ln in maps.splitlines() if "libggml-cpu-" in ln}
        names = sorted(n[len("libggml-cpu-"):-3] for n in loaded if n.endswith(".so"))
        forced = os.environ.get("LAMINA_CPU_VARIANT", "")
        how = "LAMINA_CPU_VARIANT" if forced and names == [forced] else "picked at run time"
        variant = f"portable, variant {', '.join(names) or 'unknown'} ({how})"
    cpus = allowed_cpus()
    total, avail = host_memory()
    return SystemInfo(
        lamina_version=_native.VERSION,
        llama_cpp={"version": _native.LLAMA_CPP_VERSION, "commit": _native.LLAMA_CPP_COMMIT,
                   "source": _native.LLAMA_CPP_SOURCE, "portable": _native.PORTABLE,
                   "backend_dl": _native.BACKEND_DL, "package_dir": str(PACKAGE_DIR),
                   "system_info": _native.system_info_string()},
        backends=backends, devices=devices(), cpu_model=_cpuinfo("model name"), cpu_features_present=present,
        cpu_features_compiled=dict(cpu["features"]), cpu_variant=variant, logical_cpus=os.cpu_count() or 1,
        allowed_cpus=cpus, physical_cores=physical_cores(cpus), cgroup_cpu_limit=cgroup_cpu_limit(),
        default_threads=default_threads(), default_threads_batch=default_threads_batch(), memory_total=total,
        memory_available=avail, supports=_native.supports(), addons=addons())
