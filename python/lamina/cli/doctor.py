"""`lamina doctor`: what this machine has, what lamina uses of it, and advice for one model.

``lamina doctor`` reports the CPU (model, ISA features present / compiled / the variant loaded),
cores (physical, logical, affinity, the cgroup quota of every level), memory (total, available,
swap, cgroup limit), the measured memory bandwidth (a native read and copy probe of about 1 s),
every device with its free and total memory, the backends compiled and loaded, and GPU add-ons
that failed to load with the reason. ``lamina doctor MODEL [--ctx N] [--kv q8_0] [--config
model.yml]`` adds advice with the numbers behind it: whether the model fits RAM and VRAM, the
token-generation ceiling from bandwidth against a short measured tg probe (and which bound this
machine is at), the thread count, n_gpu_layers and a quantization that fits. Warnings name known
traps (no AVX2, SMT siblings counted as cores, a model on a network file system or on swap, a GPU
backend with no device, a stale n_gpu_layers with the GPU off).

``--json`` prints the same report as one JSON object; its schema is ``docs/doctor.schema.json``
(``schema_version`` below). ``--plot out.png`` draws the measured tg speed per thread count
against the bandwidth ceiling (needs matplotlib).

The decisions are pure functions of the facts (``traps``, ``bound_of``, ``quantization_table``),
so they are testable without the machine they warn about.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import _native
from .._core import PACKAGE_DIR
from .bench import lamina_tg
from ..config import load_config
from ..errors import InertSettingWarning
from ..model import Model
from ..params import KV
from ..threads import cpu_ranges
from .plot import require
from .progress import load_bar
from ..system import (MEMORY_FILESYSTEMS, NETWORK_FILESYSTEMS, available_memory, busy_cpus, cache_sizes, cgroup_levels,
                     cgroup_memory_limit, filesystem_of, gpu_absent_reason, gpu_processes, memory_bandwidth,
                     swap_memory, system_info)

SCHEMA_VERSION = 1
MiB, GiB = 1024 ** 2, 1024 ** 3
# llama.cpp's quantizations, bits per weight averaged over a typical model's tensors
QUANTIZATIONS: list[tuple[str, float]] = [("Q8_0", 8.5), ("Q6_K", 6.56), ("Q5_K_M", 5.7), ("Q4_K_M", 4.85),
                                          ("Q4_0", 4.5)]
# measured tg at this fraction of the bandwidth ceiling or more: the machine is bandwidth-bound
BANDWIDTH_BOUND = 0.6
# a thread count is only recommended over the physical-core default when it is this much faster
THREADS_MARGIN = 1.05


# ---- traps: facts in, warnings out --------------------------------------------------------------
@dataclass(frozen=True)
class Facts:
    """What the trap checks look at; every field has a harmless default so a test sets only its own."""

    machine: str = "x86_64"  # platform.machine()
    cpu_features_present: tuple[str, ...] = ("AVX2",)
    cpu_features_compiled: tuple[str, ...] = ("AVX2",)  # enabled in the CPU variant loaded
    physical_cores: int = 1
    logical_cpus: int = 1  # allowed to this process
    gpu_backends_without_device: tuple[str, ...] = ()  # compiled/loaded GPU backends that found none
    addon_failures: tuple[str, ...] = ()  # "lamina-cuda13: why"
    gpu_device: bool = False  # a local GPU device exists
    config_threads: int | None = None
    config_threads_source: str = "default"
    config_gpu: bool = True
    config_gpu_source: str = "default"
    config_ngl: int | str | None = None
    config_ngl_source: str = "default"
    model_filesystem: str = ""
    model_mount: str = ""
    model_host_bytes: int = 0  # weights + context + compute the model needs in host memory
    memory_available: int = 0
    swap_total: int = 0
    busy_cpus: tuple[tuple[int, float], ...] = ()  # (allowed CPU, its busy share) of those >= 50 % busy
    gpu_processes: tuple[str, ...] = ()  # other processes on the GPUs: "pid name MiB"


@dataclass(frozen=True)
class Trap:
    code: str
    message: str


# present on the CPU but never in ggml's feature list (SSE4.2 is implied by AVX builds; AMX_TILE by AMX_INT8)
_NOT_REPORTED_BY_GGML = frozenset({"SSE42", "AMX_TILE"})
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def traps(f: Facts) -> list[Trap]:
    """The known traps these facts show, each with a message that says what to do."""
    out: list[Trap] = []
    if f.machine.lower() in _X86 and "AVX2" not in f.cpu_features_present:
        out.append(Trap("no_avx2", "this CPU has no AVX2: llama.cpp's quantized kernels run several times "
                                      "slower; expect low tg and pp speeds (a CPU with AVX2 is worth it)"))
    missing = [x for x in ("AVX2", "AVX512") if x in f.cpu_features_present and x not in f.cpu_features_compiled]
    if f.machine.lower() in _X86 and missing:
        out.append(Trap("isa_unused", f"the CPU has {' and '.join(missing)} but the CPU backend in use was "
                                         "not built for it (a lower variant, or a generic build)"))
    if f.config_threads is not None and f.config_threads > f.physical_cores:
        out.append(Trap("smt_threads", f"threads={f.config_threads} ({f.config_threads_source}) is more than "
                                          f"the {f.physical_cores} physical cores: SMT siblings counted as cores "
                                          "share one core's units and slow token generation; use "
                                          f"threads={f.physical_cores} (or leave it unset)"))
    if f.model_filesystem in NETWORK_FILESYSTEMS:
        out.append(Trap("network_fs", f"the model is on a network file system ({f.model_filesystem} at "
                                         f"{f.model_mount}): loading reads it over the network, and mmap may page "
                                         "weights back in from there; copy it to a local disk"))
    if f.model_filesystem in MEMORY_FILESYSTEMS and f.swap_total > 0:
        out.append(Trap("model_on_swap", f"the model is on {f.model_filesystem} ({f.model_mount}) and this "
                                            "machine has swap: under memory pressure its pages go to swap and "
                                            "generation reads them back from disk"))
    elif f.model_host_bytes and f.memory_available and f.model_host_bytes > f.memory_available:
        where = "swap" if f.swap_total > 0 else "the model file (mmap re-reads evicted pages)"
        out.append(Trap("model_on_swap", f"the model needs {_gib(f.model_host_bytes)} of host memory but "
                                            f"{_gib(f.memory_available)} is available: pages will come from "
                                            f"{where} on every token; use a smaller quantization or context"))
    for b in f.gpu_backends_without_device:
        out.append(Trap("gpu_no_device", f"the {b} backend is compiled in but found no device: everything "
                                            "runs on the CPU (check the driver, and that this process can see "
                                            "the GPU, e.g. CUDA_VISIBLE_DEVICES or container flags)"))
    for a in f.addon_failures:
        out.append(Trap("addon_failed", f"GPU add-on {a}"))
    if f.busy_cpus:
        shares = ", ".join(f"{c}: {s:.0%}" for c, s in f.busy_cpus)
        out.append(Trap("busy_cpus", f"CPU(s) {cpu_ranges(c for c, _ in f.busy_cpus)} were busy with other work while "
                                     f"doctor sampled ({shares}): ggml's generation threads meet at a barrier for "
                                     "every op, so a thread on a busy CPU stalls the others (README, 'Running beside "
                                     "other work'); lamina's default count moves to fewer threads when it sees "
                                     "that (ctx.threads_why); a given threads= is obeyed: give the free physical "
                                     "cores, or pin lamina to idle CPUs with lamina.Threads(cpus=...)"))
    if f.gpu_processes:
        out.append(Trap("gpu_shared", f"other processes hold the GPU ({'; '.join(f.gpu_processes)}): lamina's kernels "
                                      "share the card with theirs and generation slows with their load (1.5-6x "
                                      "beside a busy torch loop on an H100: README, 'Running beside other work')"))
    inert = (f"gpu is off ({f.config_gpu_source}); remove it, or turn the GPU on" if not f.config_gpu else
             "this machine has no GPU device, so everything stays on the CPU" if not f.gpu_device else "")
    if inert and f.config_ngl_source != "default" and f.config_ngl not in (None, 0):
        out.append(Trap("stale_ngl", f"n_gpu_layers={f.config_ngl!r} ({f.config_ngl_source}) is inert: {inert}"))
    return out


# ---- advice: pure functions of the numbers -------------------------------------------------------
def bound_of(measured_tps: float, ceiling_tps: float, weight_bytes: int, llc_bytes: int) -> tuple[str, str]:
    """("memory-bandwidth" | "compute", why) for a measured tg speed against the bandwidth ceiling."""
    if llc_bytes and weight_bytes <= llc_bytes:
        return "compute", (f"the weights ({_mib(weight_bytes)}) fit in the last-level cache ({_mib(llc_bytes)}): "
                           "memory bandwidth is not the limit, per-token compute and overhead are")
    frac = measured_tps / ceiling_tps if ceiling_tps else 0.0
    if frac >= BANDWIDTH_BOUND:
        return "memory-bandwidth", (f"measured {measured_tps:.1f} t/s is {frac:.0%} of the {ceiling_tps:.1f} t/s "
                                    "bandwidth ceiling: a smaller quantization is faster, more threads are not")
    return "compute", (f"measured {measured_tps:.1f} t/s is {frac:.0%} of the {ceiling_tps:.1f} t/s bandwidth "
                       "ceiling: compute (threads, ISA) limits generation before memory does")


def quantization_table(n_params: int, kv_bytes: int, compute_bytes: int, ram_free: int, vram_free: int,
                       read_gbs: float) -> list[dict[str, Any]]:
    """Each quantization's weight bytes (n_params x bits / 8), whether weights + KV + compute fit the
    host memory and the GPUs' free memory (vram_free 0: no GPU), and its tg ceiling at the read
    bandwidth (weights read once per token, empty context)."""
    out = []
    for name, bpw in QUANTIZATIONS:
        weights = int(n_params * bpw / 8)
        need = weights + kv_bytes + compute_bytes
        out.append({"name": name, "bits_per_weight": bpw, "weight_bytes": weights, "bytes_needed": need,
                    "fits_ram": need <= ram_free, "fits_vram": need <= vram_free if vram_free else None,
                    "ceiling_tps": read_gbs * 1e9 / weights if weights and read_gbs else None})
    return out


def recommend_quantization(table: list[dict[str, Any]], gpu: bool) -> tuple[str | None, str]:
    """The highest-quality quantization that fits (VRAM when there is a GPU, else RAM), and why."""
    key = "fits_vram" if gpu else "fits_ram"  # (fits_vram is None without a GPU)
    where = "VRAM" if gpu else "RAM"
    fits = [q for q in table if q[key]]
    if not fits and gpu:
        key, where = "fits_ram", "RAM (partly offloaded)"
        fits = [q for q in table if q[key]]
    if not fits:
        return None, "no quantization down to Q4_0 fits: use a smaller model or a shorter context"
    best, fastest = fits[0], table[-1]
    why = f"the highest quality that fits {where} with the KV cache"
    if best is not fastest and best["ceiling_tps"] and fastest["ceiling_tps"]:
        why += (f"; {fastest['name']} would raise the bandwidth ceiling {fastest['ceiling_tps'] / best['ceiling_tps']:.2f}x "
                f"({best['ceiling_tps']:.0f} -> {fastest['ceiling_tps']:.0f} t/s) at some loss of quality")
    return best["name"], why


def recommend_threads(sweep: list[dict[str, Any]], default: int) -> tuple[int, str]:
    """The thread count to use from a tg sweep [{threads, tokens_per_s}]: the physical-core default
    unless another count is clearly (THREADS_MARGIN) faster."""
    if not sweep:
        return default, f"the default: physical cores this process may use ({default})"
    best = max(sweep, key=lambda r: r["tokens_per_s"])
    at_default = next((r for r in sweep if r["threads"] == default), None)
    if at_default and best["tokens_per_s"] < at_default["tokens_per_s"] * THREADS_MARGIN:
        return default, (f"the default (physical cores this process may use): {at_default['tokens_per_s']:.1f} t/s, "
                         f"within {THREADS_MARGIN - 1:.0%} of the best in the sweep")
    return best["threads"], (f"fastest in the sweep ({best['tokens_per_s']:.1f} t/s); the default would be "
                             f"{default} (physical cores)")


# ---- the machine ----------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def _compiled_backends() -> list[str]:
    """Backends this lamina carries: libraries in the package (portable builds) or linked in."""
    if _native.BACKEND_DL:
        names = {p.name[len("libggml-"):].split(".")[0] for p in Path(PACKAGE_DIR).glob("libggml-*")}
        names = {("CPU" if n.startswith("cpu") else n) for n in names if n != "base"}
        return sorted(names)
    return sorted(b["name"] for b in _native.backends())


def machine_report(bandwidth_seconds: float = 1.0) -> dict[str, Any]:
    """The machine part of ``lamina doctor --json`` (bandwidth_seconds=0 skips the probe)."""
    busy = busy_cpus()  # first: the bandwidth probe below keeps every CPU busy
    si = system_info()
    swap_total, swap_free = swap_memory()
    compiled_on = [k for k, v in si.cpu_features_compiled.items() if v == "1"]
    levels = cgroup_levels()
    mem_limit = cgroup_memory_limit()
    bw = {**asdict(memory_bandwidth(bandwidth_seconds, threads=si.default_threads)), "copy_counts": "read+write"} \
        if bandwidth_seconds > 0 else None
    loaded = [{"name": b["name"], "n_devices": int(b["n_devices"])} for b in si.backends]
    gpu_names = [b["name"] for b in loaded
                 if b["name"].upper() not in ("CPU", "BLAS") and not b["name"].upper().startswith("RPC")]
    gpu_devices = [d for d in si.devices if d.kind in ("gpu", "igpu")]
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "lamina": {"version": si.lamina_version, "llama_cpp_version": si.llama_cpp["version"],
                   "llama_cpp_commit": si.llama_cpp["commit"], "llama_cpp_source": si.llama_cpp["source"],
                   "portable": bool(si.llama_cpp["portable"])},
        "cpu": {"model": si.cpu_model, "machine": platform.machine(),
                "features_present": si.cpu_features_present, "features_compiled": compiled_on,
                "features_unused": [f for f in si.cpu_features_present
                                    if f not in compiled_on and f not in _NOT_REPORTED_BY_GGML],
                "variant": si.cpu_variant, "logical_cpus": si.logical_cpus, "allowed_cpus": si.allowed_cpus,
                "physical_cores": si.physical_cores, "caches": cache_sizes(),
                "default_threads": si.default_threads, "default_threads_batch": si.default_threads_batch,
                "busy": {str(c): round(s, 3) for c, s in busy.items()}},
        "cgroup": {"levels": [asdict(lv) for lv in levels], "cpu_limit": si.cgroup_cpu_limit,
                   "memory_limit": mem_limit},
        "memory": {"total": si.memory_total, "available": si.memory_available, "swap_total": swap_total,
                   "swap_free": swap_free, "cgroup_limit": mem_limit},
        "bandwidth": bw,
        "devices": [asdict(d) for d in si.devices],
        "gpu_processes": gpu_processes(),
        "backends": {"compiled": _compiled_backends(), "loaded": loaded,
                     "addons": [{"name": a.name, "distribution": a.distribution, "version": a.version,
                                 "loaded": bool(a.loaded), "error": a.error or None} for a in si.addons],
                     "gpu_absent_reason": None if gpu_devices else gpu_absent_reason()},
        "warnings": [],
        "model": None,
    }
    report["_facts"] = Facts(
        machine=platform.machine(), cpu_features_present=tuple(si.cpu_features_present),
        cpu_features_compiled=tuple(compiled_on), physical_cores=si.physical_cores,
        logical_cpus=len(si.allowed_cpus),
        gpu_backends_without_device=tuple(n for n in gpu_names if not any(
            b["n_devices"] for b in loaded if b["name"] == n)),
        addon_failures=tuple(f"{a.distribution}: {a.error}" for a in si.addons if not a.loaded),
        gpu_device=bool(gpu_devices), memory_available=available_memory(si.memory_available),
        swap_total=swap_total, busy_cpus=tuple((c, s) for c, s in busy.items() if s >= 0.5),
        gpu_processes=tuple(report["gpu_processes"]))
    return report


# ---- the model --------------------------------------------------------------------------------------
def model_report(report: dict[str, Any], path: str, n_ctx: int, kv_type: str, config: Any = None,
                 tg_tokens: int = 16, progress: Any = None) -> dict[str, Any]:
    """Advice for one model on this machine: fit, ceiling vs measured tg, threads, ngl, quantization."""
    facts: Facts = report["_facts"]
    kv = KV(type_k=kv_type, type_v=kv_type)
    # a model.yml places the model as `lamina run` would (its gpu, n_gpu_layers, devices, ...)
    model = (Model.from_config(config, n_ctx=n_ctx, kv=kv, progress=progress) if config is not None
             else Model(path, n_ctx=n_ctx, kv=kv, progress=progress))
    with model:
        info, off = model.info, model.offload
        est = model.estimate_memory(n_ctx, kv=kv)
        host_free = available_memory(report["memory"]["available"])
        rows: list[dict[str, Any]] = []
        for d in est.devices:
            free = host_free if d.device == "host" else d.free
            rows.append({"device": d.device, "model_bytes": d.model, "context_bytes": d.context,
                         "compute_bytes": d.compute, "bytes": d.bytes, "free": free, "fits": d.bytes <= free})
        host = next((r for r in rows if r["device"] == "host"), rows[0])
        gpu_rows = [r for r in rows if r["device"] != "host"]
        fs, mount, _ = filesystem_of(path)
        # bytes read per token: the weights on the CPU once (a dense model reads every matrix per
        # token; the token-embedding table is an approximation: one row is read unless the output
        # head shares it), plus the KV cache up to the context fill
        weights_cpu = host["model_bytes"]
        kv_full = host["context_bytes"]
        bw = report["bandwidth"]
        read_gbs = float(bw["read_gbs"]) if bw else 0.0
        ceiling_empty = read_gbs * 1e9 / weights_cpu if read_gbs and weights_cpu else None
        ceiling_full = read_gbs * 1e9 / (weights_cpu + kv_full) if read_gbs and weights_cpu else None

        default_threads = report["cpu"]["default_threads"]
        counts = sorted({1, max(1, facts.physical_cores // 2), default_threads, facts.physical_cores})
        # best of two after a warm-up: a busy neighbour slows one
        sweep = [{"threads": t, "tokens_per_s": max(lamina_tg(model, tg_tokens, t, 2))}
                 for t in counts if tg_tokens > 0]
        threads, threads_why = recommend_threads(sweep, default_threads)
        measured = max((r["tokens_per_s"] for r in sweep), default=None)
        llc = max(cache_sizes().values(), default=0)
        bound, bound_why = (bound_of(measured, ceiling_empty, weights_cpu, llc)
                            if measured and ceiling_empty else (None, "not measured"))
        if off.layers_effective and gpu_rows:
            bound_why += ("; layers on the GPU read from VRAM at the GPU's own bandwidth, which this "
                          "ceiling (host memory only) leaves out")

        if not off.gpu:
            ngl: int | str = 0
            ngl_why = "; ".join(off.reasons) or "the GPU is off"
        elif off.layers_effective >= info.n_layer + 1:
            ngl, ngl_why = "all", f"every layer ({info.n_layer + 1}) fits the GPU with a {n_ctx}-token context"
        else:
            ngl = off.layers_effective
            ngl_why = (f"{off.layers_effective} of {info.n_layer + 1} layers fit free GPU memory with a "
                       f"{n_ctx}-token context (the 'auto' fit)")
        vram_free = sum(r["free"] for r in gpu_rows)
        table = quantization_table(info.n_params, est.kv_bytes, host["compute_bytes"], host_free,
                                   vram_free if off.gpu else 0, read_gbs)
        quant, quant_why = recommend_quantization(table, bool(off.gpu and gpu_rows))

    report["_facts"] = replace(facts, model_filesystem=fs, model_mount=mount, model_host_bytes=host["bytes"])
    return {
        "path": str(path), "arch": info.arch, "name": info.name, "description": info.desc,
        "n_params": info.n_params, "size": info.size, "n_layer": info.n_layer,
        "filesystem": fs, "mount": mount,
        "n_ctx": n_ctx, "kv_type": kv_type,
        "memory": {"devices": rows, "fits_ram": host["fits"], "fits_vram": all(r["fits"] for r in gpu_rows)
                   if gpu_rows else None},
        "offload": {"gpu": off.gpu, "layers_effective": off.layers_effective, "n_layers": info.n_layer + 1,
                    "reasons": list(off.reasons)},
        "tg": {"bytes_per_token_weights": weights_cpu, "bytes_per_token_kv_full": kv_full,
               "approximation": ("bytes read per token = weight bytes in host memory (every matrix once per "
                                 "token for a dense model) + the KV cache filled so far (0 at the start, "
                                 "all context bytes at n_ctx); ceiling = read bandwidth / those bytes"),
               "read_gbs": read_gbs or None, "ceiling_tps_empty": ceiling_empty, "ceiling_tps_full": ceiling_full,
               "tokens": tg_tokens, "sweep": sweep, "measured_tps": measured,
               "efficiency": measured / ceiling_empty if measured and ceiling_empty else None,
               "bound": bound, "bound_why": bound_why},
        "recommend": {"threads": threads, "threads_why": threads_why, "n_gpu_layers": ngl, "n_gpu_layers_why": ngl_why,
                      "quantization": quant, "quantization_why": quant_why},
        "quantizations": table,
    }


def config_facts(facts: Facts, config: Any) -> Facts:
    """Facts with a model.yml's settings (Config) for the SMT and stale-ngl checks."""
    return replace(facts, config_threads=config.given("threads"), config_threads_source=config.source("threads"),
                   config_gpu=bool(config["gpu"]), config_gpu_source=config.source("gpu"),
                   config_ngl=config["n_gpu_layers"], config_ngl_source=config.source("n_gpu_layers"))


def doctor_report(model: str | None = None, *, n_ctx: int = 4096, kv_type: str = "f16", config: Any = None,
                  bandwidth_seconds: float = 1.0, tg_tokens: int = 16, progress: Any = None) -> dict[str, Any]:
    """The whole ``lamina doctor --json`` object (docs/doctor.schema.json)."""
    report = machine_report(bandwidth_seconds)
    if config is not None:
        report["_facts"] = config_facts(report["_facts"], config)
    if model is not None:
        report["model"] = model_report(report, model, n_ctx, kv_type, config, tg_tokens, progress)
    report["warnings"] = [asdict(w) for w in traps(report.pop("_facts"))]
    return report


# ---- output -----------------------------------------------------------------------------------------
def render_text(r: dict[str, Any]) -> str:
    """The report for a terminal."""
    cpu, mem, lam = r["cpu"], r["memory"], r["lamina"]
    lines = [f"lamina {lam['version']}  llama.cpp {lam['llama_cpp_version']} ({lam['llama_cpp_commit']}, "
             f"{lam['llama_cpp_source']}{', portable' if lam['portable'] else ''})",
             f"cpu: {cpu['model'] or 'unknown'} ({cpu['machine']})",
             f"  ISA present:  {' '.join(cpu['features_present']) or '-'}",
             f"  compiled:     {' '.join(cpu['features_compiled']) or '-'}",
             f"  variant:      {cpu['variant']}"]
    if cpu["features_unused"]:
        lines.append(f"  not used by this build: {' '.join(cpu['features_unused'])}")
    caches = ", ".join(f"{k} {_mib(v) if v >= MiB else f'{v // 1024} KiB'}" for k, v in cpu["caches"].items())
    lines += [f"cores: {cpu['physical_cores']} physical, {cpu['logical_cpus']} logical, affinity "
              f"{cpu_ranges(sorted(cpu['allowed_cpus']))} ({len(cpu['allowed_cpus'])} allowed)"
              + (f"; caches {caches}" if caches else ""),
              f"threads: {cpu['default_threads']} for generation (physical cores), {cpu['default_threads_batch']} "
              "for batches (logical CPUs)"]
    cg = r["cgroup"]
    if cg["levels"]:
        quota = f"{cg['cpu_limit']:g} CPUs" if cg["cpu_limit"] else "none"
        lines.append(f"cgroup v{cg['levels'][0]['version']}: cpu quota {quota}")
        for lv in cg["levels"]:
            cpu_q = f"{lv['cpu_limit']:g} CPUs" if lv["cpu_limit"] is not None else "no cpu quota"
            mem_q = _gib(lv["memory_limit"]) if lv["memory_limit"] is not None else "no memory limit"
            lines.append(f"  {lv['path']}: {cpu_q}, {mem_q}")
    else:
        lines.append("cgroup: none found")
    lines.append(f"memory: {_gib(mem['total'])} total, {_gib(mem['available'])} available, swap "
                 f"{_gib(mem['swap_total'])} ({_gib(mem['swap_free'])} free)"
                 + (f", cgroup limit {_gib(mem['cgroup_limit'])}" if mem["cgroup_limit"] is not None else ""))
    bw = r["bandwidth"]
    if bw:
        lines.append(f"bandwidth: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s (read+write), "
                     f"{bw['threads']} threads over {_mib(bw['bytes'])}, {bw['seconds']:.1f} s")
    be = r["backends"]
    lines.append(f"backends: compiled {', '.join(be['compiled']) or '-'}; loaded "
                 + ", ".join(f"{b['name']} ({b['n_devices']} device{'s' if b['n_devices'] != 1 else ''})"
                             for b in be["loaded"]))
    for a in be["addons"]:
        lines.append(f"  add-on {a['distribution']} {a['version']}: "
                     + ("loaded" if a["loaded"] else f"FAILED: {a['error']}"))
    if be["gpu_absent_reason"]:
        lines.append(f"gpu: none: {be['gpu_absent_reason']}")
    lines.append("devices:")
    for d in r["devices"]:
        m = "" if d["memory_free"] is None else f": {_gib(d['memory_free'])} free of {_gib(d['memory_total'])}"
        lines.append(f"  {d['index']} {d['name']} [{d['backend']}, {d['kind']}] {d['description']}{m}")
    if r["model"]:
        lines += _render_model(r["model"])
    if r["warnings"]:
        lines.append("warnings:")
        lines += [f"  ! {w['message']} [{w['code']}]" for w in r["warnings"]]
    else:
        lines.append("warnings: none")
    return "\n".join(lines)


def _yes_no(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def _render_model(m: dict[str, Any]) -> list[str]:
    tg, rec = m["tg"], m["recommend"]
    lines = [f"model: {m['path']}",
             f"  {m['description'] or m['arch']}: {m['n_params'] / 1e6:,.0f}M params, {_mib(m['size'])}, "
             f"{m['n_layer']} layers; on {m['filesystem'] or '?'} ({m['mount'] or '?'})",
             f"memory for n_ctx={m['n_ctx']}, KV {m['kv_type']}:",
             f"  {'device':<12}{'model':>12}{'context':>12}{'compute':>12}{'needs':>12}{'free':>12}  fits"]
    for d in m["memory"]["devices"]:
        lines.append(f"  {d['device']:<12}{d['model_bytes'] / MiB:>8,.1f} MiB{d['context_bytes'] / MiB:>8,.1f} MiB"
                     f"{d['compute_bytes'] / MiB:>8,.1f} MiB{d['bytes'] / MiB:>8,.1f} MiB{d['free'] / MiB:>8,.0f} MiB"
                     f"  {'yes' if d['fits'] else 'NO'}")
    fv = m["memory"]["fits_vram"]
    lines += [f"  fits RAM: {'yes' if m['memory']['fits_ram'] else 'NO'}; fits VRAM: "
              f"{'no GPU in use' if fv is None else 'yes' if fv else 'NO'}", "token generation:",
              f"  bytes read per token ~ {_mib(tg['bytes_per_token_weights'])} weights + KV so far "
              f"(0 .. {_mib(tg['bytes_per_token_kv_full'])} at {m['n_ctx']} tokens)"]
    if tg["ceiling_tps_empty"]:
        lines.append(f"  ceiling at {tg['read_gbs']:.1f} GB/s read: {tg['ceiling_tps_empty']:.1f} t/s (empty context), "
                     f"{tg['ceiling_tps_full']:.1f} t/s (full context)")
    if tg["sweep"]:
        lines.append(f"  measured tg{tg['tokens']}: " + ", ".join(
            f"{s['threads']} thread{'s' if s['threads'] != 1 else ''} {s['tokens_per_s']:.1f} t/s" for s in tg["sweep"]))
    if tg["bound"]:
        lines.append(f"  bound: {tg['bound']}: {tg['bound_why']}")
    eff = m["size"] * 8 / m["n_params"] if m["n_params"] else 0
    lines += ["recommend:",
              f"  threads={rec['threads']}: {rec['threads_why']}",
              f"  n_gpu_layers={rec['n_gpu_layers']!r}: {rec['n_gpu_layers_why']}",
              f"  quantization: {rec['quantization'] or 'none fits'}: {rec['quantization_why']}",
              f"quantizations of {m['n_params'] / 1e6:,.0f}M params (with this context's KV and compute buffers; "
              f"average bits per weight: this file has {eff:.2f}, as real files keep some tensors wider):"]
    for q in m["quantizations"]:
        ceiling = f"{q['ceiling_tps']:>8.1f} t/s" if q["ceiling_tps"] else "       - t/s"
        lines.append(f"  {q['name']:<7}{q['bits_per_weight']:>5.2f} bpw {q['weight_bytes'] / MiB:>10,.1f} MiB  "
                     f"RAM {'yes' if q['fits_ram'] else 'no':<3}  VRAM {_yes_no(q['fits_vram']):<3}  "
                     f"ceiling {ceiling}")
    return lines


def plot_report(r: dict[str, Any], out: str) -> None:
    """tg measured per thread count (bars) against the bandwidth ceiling (lines), saved to ``out``."""
    require()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = r["model"]
    tg = m["tg"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [str(s["threads"]) for s in tg["sweep"]]
    ax.bar(xs, [s["tokens_per_s"] for s in tg["sweep"]], color="tab:blue", label="measured tg")
    if tg["ceiling_tps_empty"]:
        ax.axhline(tg["ceiling_tps_empty"], color="tab:red", label=f"bandwidth ceiling, empty context "
                   f"({tg['read_gbs']:.1f} GB/s)")
        ax.axhline(tg["ceiling_tps_full"], color="tab:red", linestyle="--", label=f"ceiling at {m['n_ctx']} tokens")
    top = max([s["tokens_per_s"] for s in tg["sweep"]] + [tg["ceiling_tps_empty"] or 0])
    ax.set_ylim(0, top * 1.45)  # room for the legend above the ceiling line
    ax.set(xlabel="threads", ylabel="tokens/s", title=f"{Path(m['path']).name}: {tg['bound'] or 'not measured'}-bound")
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---- CLI --------------------------------------------------------------------------------------------
def add_cli(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("doctor", help="what this machine has, what lamina uses, and advice for a model")
    p.add_argument("model", nargs="?", default=None, help="GGUF model to advise on (default: the config's, if any)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context tokens to plan for (default 4096)")
    p.add_argument("--kv", default=None, help="KV cache type for K and V: f16, q8_0, q4_0, ... (default f16)")
    p.add_argument("--config", default=None, help="model.yml: its gpu/n_gpu_layers/threads are checked too")
    p.add_argument("--json", action="store_true", help="one JSON object (schema: docs/doctor.schema.json)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw tg measured vs the bandwidth ceiling")
    p.add_argument("--bandwidth-seconds", type=_seconds, default=1.0, help="bandwidth probe time (0: skip it)")
    p.add_argument("--tg-tokens", type=_tokens, default=16, help="tokens per tg probe run (0: no probe)")
    p.set_defaults(func=cmd_doctor)


def _seconds(text: str) -> float:
    x = float(text)
    if not 0 <= x <= 60:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected seconds in [0, 60], got {text!r}")
    return x


def _tokens(text: str) -> int:
    n = int(text)
    if not 0 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"expected tokens in [0, 4096], got {text!r}")
    return n


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.plot:
        require()  # before minutes of probing
    # the settings as run/chat/bench see them: the file (if any) < LAMINA_* < the MODEL argument
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InertSettingWarning)
        config = load_config(args.config, **({"model": args.model} if args.model else {}))
    for w in caught:  # the report's traps cover a stale n_gpu_layers and too many threads; the rest go here
        if not issubclass(w.category, InertSettingWarning) or \
                not str(w.message).startswith(("n_gpu_layers=", "threads=", "threads_batch=")):
            print(f"lamina doctor: {w.category.__name__}: {w.message}", file=sys.stderr)
    model = config["model"]
    if args.plot and model is None:
        raise ValueError("--plot needs a model: lamina doctor MODEL --plot out.png")
    n_ctx = args.ctx if args.ctx is not None else (config["n_ctx"] or 4096)
    kv_type = args.kv or config["type_k"]
    bar = load_bar(f"loading {os.path.basename(model)}") if model else None
    report = doctor_report(model, n_ctx=n_ctx, kv_type=kv_type, config=config,
                           bandwidth_seconds=args.bandwidth_seconds, tg_tokens=args.tg_tokens, progress=bar)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
