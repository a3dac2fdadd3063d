"""`lamina bench`: pp/tg throughput through lamina's own API, like llama-bench, and side by side
with llama-bench built from the same pinned source (--compare). --parallel (batched generation
against llama-batched-bench) and --draft (speculative decoding against llama-speculative-simple)
live in lamina.cli.bench_batch, which says what each side times.

tg<N>: llama-bench decodes BOS plus N-1 random tokens, one per decode. lamina streams
       ctx.generate([BOS], max_tokens=N, ignore_eos=True): the same N decodes plus real greedy
       sampling and UTF-8 detokenization, timed by the Python wall clock around the iteration.
pp<P>: P random tokens (BOS first) in one decode, from an empty cache, both sides.
-ngl 0,4,8,all loads the model once per value (the previous one closed first) and measures each;
the table says where the layers went, so with no GPU (the values inert) it shows every row on the CPU.
--plot FILE.png draws t/s against threads or layers (lamina.cli.plot, needs `lamina[plot]`).
With --compare, rounds alternate llama-bench and lamina so drift hits both; medians of all
repetitions. With one repetition per round (-r 1 --rounds N) the samples are pairs run back to
back, and the median of the paired ratios is reported too: on a shared machine whose speed
drifts by 10-30% within minutes, that is the figure to quote. Results are never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import tools
from . import bench_batch, plot
from .bench_batch import count, int_list, md_table, paired_ratio, random_prompt, sample_stats, spread
from .args import add_model_args, models
from ..model import Model
from ..params import BENCH_KV, NGL, parse_ngl
from ..system import system_info
from ..threads import Threads


@dataclass
class Result:
    test: str
    threads: int
    lamina: list[float] = field(default_factory=list)
    llama_bench: list[float] = field(default_factory=list)
    n_gpu_layers: NGL | None = None  # what was asked (-ngl, model.yml or LAMINA_N_GPU_LAYERS)
    layers_offloaded: int = 0  # what llama.cpp placed on devices (model.offload.layers_effective)
    devices: list[str] = field(default_factory=list)  # devices in use; empty: gpu off, everything on the CPU
    reps_per_round: int = 1  # repetitions of each side back to back; pairs exist only with one

    def as_dict(self) -> dict[str, object]:
        med = statistics.median(self.lamina) if self.lamina else 0.0
        d: dict[str, object] = {"test": self.test, "threads": self.threads, **sample_stats("lamina", self.lamina),
                                "n_gpu_layers": self.n_gpu_layers, "layers_offloaded": self.layers_offloaded,
                                "devices": self.devices}
        if self.llama_bench:
            bmed = statistics.median(self.llama_bench)
            d.update(sample_stats("llama_bench", self.llama_bench), ratio=med / bmed,
                     overhead_us_per_token=(1 / med - 1 / bmed) * 1e6)
            if self.paired:
                d["paired_ratio_median"] = paired_ratio(self.lamina, self.llama_bench)
        return d

    @property
    def placement(self) -> str:
        """The -ngl asked and what happened, for tables: '4 (inert: CPU only)', 'all (19 layers on RPC0)'."""
        asked = "config" if self.n_gpu_layers is None else str(self.n_gpu_layers)
        if not self.devices:
            return f"{asked} (CPU only)" if self.n_gpu_layers in (None, 0, "auto") else f"{asked} (inert: CPU only)"
        return f"{asked} ({self.layers_offloaded} layers on {'+'.join(self.devices)})"

    @property
    def paired(self) -> bool:
        """One repetition per side per round: sample i of each side ran back to back, so the
        ratio of each pair cancels the machine's drift between rounds."""
        return self.reps_per_round == 1 and len(self.lamina) == len(self.llama_bench) > 1


def llama_bench_path() -> Path | None:
    return tools.path("llama-bench")


def lamina_tg(model: Model, n_gen: int, threads: int, reps: int, backend_sampling: bool = False) -> list[float]:
    bos = model.info.bos if model.info.add_bos else 0
    out = []
    with model.context(n_ctx=n_gen, threads=Threads(n=threads, batch=threads), kv=BENCH_KV) as ctx:
        for r in range(reps + 1):  # the first run warms up, as llama-bench does
            ctx.kv_clear()
            t0 = time.perf_counter()
            gen = ctx.generate([bos], max_tokens=n_gen, ignore_eos=True, backend_sampling=backend_sampling)
            for _ in gen:
                pass
            dt = time.perf_counter() - t0
            if r:
                out.append(len(gen.tokens) / dt)
    return out


def lamina_pp(model: Model, n_prompt: int, threads: int, reps: int) -> list[float]:
    rng = np.random.default_rng(0)
    out = []
    with model.context(n_ctx=n_prompt, n_batch=max(n_prompt, 2048), threads=Threads(n=threads, batch=threads),
                       kv=BENCH_KV) as ctx:
        for r in range(reps + 1):
            toks = random_prompt(rng, model.info, n_prompt)
            ctx.kv_clear()
            t0 = time.perf_counter()
            ctx.decode(toks)
            dt = time.perf_counter() - t0
            if r:
                out.append(n_prompt / dt)
    return out


def run_llama_bench(bench: Path | None, model_path: Path, test: str, n: int, threads: int, reps: int,
                    extra: list[str]) -> list[float]:
    """llama-bench's samples (tokens/s): the shipped one (bench=None) with lamina's backends, or yours."""
    args = ["-p", "0", "-n", str(n)] if test == "tg" else ["-p", str(n), "-n", "0"]
    cmd = ["-m", str(Path(model_path).resolve()), "-t", str(threads), "-r", str(reps), "-o", "json", *args, *extra]
    res = tools.run("llama-bench", cmd, capture_output=True) if bench is None else \
        subprocess.run([str(bench), *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return [float(x) for t in json.loads(res.stdout) for x in t["samples_ts"]]


def run(model: Model, *, n_prompt: int = 512, n_gen: int = 128, threads: list[int], reps: int = 5,
        compare: bool = False, rounds: int = 1, bench: Path | None = None, bench_args: list[str] | None = None,
        backend_sampling: bool = False) -> list[Result]:
    tests = [t for t in (("pp", n_prompt), ("tg", n_gen)) if t[1] > 0]
    results = {(t, n, th): Result(f"{t}{n}", th, reps_per_round=reps, **bench_batch.placement_of(model))
               for t, n in tests for th in threads}
    if compare and bench is None and llama_bench_path() is None:
        raise FileNotFoundError("llama-bench is not shipped in this build (LAMINA_BUILD_TOOLS=OFF): pass its path")
    for _ in range(rounds):
        for (t, n, th), res in results.items():
            if compare:
                extra = bench_batch.placement_args(model, sep="/") if bench_args is None else bench_args
                res.llama_bench += run_llama_bench(bench, model.path, t, n, th, reps, extra)
            res.lamina += (lamina_pp(model, n, th, reps) if t == "pp"
                           else lamina_tg(model, n, th, reps, backend_sampling))
    return list(results.values())


def markdown(model: Model, results: list[Result]) -> str:
    compare = any(r.llama_bench for r in results)
    paired = compare and all(r.paired for r in results)
    head = ["model", "test", "threads", "ngl (placed)", "lamina t/s"] + (
        ["llama-bench t/s", "ratio", "overhead/token"] if compare else []) + (["paired ratio"] if paired else [])
    rows = []
    for r in results:
        d = r.as_dict()
        rows.append([model.info.desc, r.test, str(r.threads), r.placement, spread(d, "lamina", 2)])
        if compare:
            rows[-1] += [spread(d, "llama_bench", 2), f"{d['ratio']:.3f}", f"{d['overhead_us_per_token']:+.1f} µs"]
        if paired:
            rows[-1].append(f"{d['paired_ratio_median']:.3f}")
    lines = md_table(head, rows) + [""]
    devices = sorted({d for r in results for d in r.devices})
    lines.append(f"medians of {len(results[0].lamina) if results else 0} runs; device: "
                 + (", ".join(devices) if devices else "CPU"))
    if any(r.n_gpu_layers not in (None, 0, "auto") for r in results) and not devices:
        lines.append("no GPU: every layer stayed on the CPU; the -ngl values were inert")
    return "\n".join(lines)


# -- `lamina bench` ----------------------------------------------------------------------
def _ngl_list(value: str) -> list[NGL]:
    try:
        return [parse_ngl(v) for v in value.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} in the list {value!r} (e.g. 0,4,8,all)") from None


def add_cli(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    # "resolve": bench's -t and -ngl are sweep lists and replace the single values of add_model_args
    p = sub.add_parser("bench", help="pp/tg throughput (like llama-bench); --compare runs llama-bench too",
                       conflict_handler="resolve")
    add_model_args(p)
    p.add_argument("-ngl", "--n-gpu-layers", type=_ngl_list, default=None,
                   help="comma list, e.g. 0,4,8,all (a sweep: one model load per value); int, 'all' or 'auto'")
    p.add_argument("-p", "--n-prompt", type=count(0), default=512, help="prompt tokens (0: no pp test)")
    p.add_argument("-n", "--n-gen", type=count(0), default=128, help="generated tokens (0: no tg test)")
    p.add_argument("-r", "--reps", type=count(1), default=5)
    p.add_argument("-t", "--threads", type=int_list("ints, e.g. 1,2,4", None, "thread counts are >= 1"), default=None,
                   help="comma list, e.g. 1,2,4 (a sweep)")
    p.add_argument("--rounds", type=count(1), default=1)
    p.add_argument("--compare", action="store_true", help="run llama-bench from the same source in the same run")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md")
    p.add_argument("--json", dest="output", action="store_const", const="json", help="the same as -o json")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw t/s against threads or -ngl layers (needs matplotlib: pip install \"lamina[plot]\")")
    bench_batch.add_args(p)
    p.set_defaults(func=cmd_bench, bench_parser=p)


def cmd_bench(args: "argparse.Namespace") -> int:
    if args.parallel or args.draft:
        return bench_batch.cmd_bench(args)
    if args.plot:
        plot.require()  # before minutes of measuring, not after
    results: list[Result] = []
    first: Model | None = None  # names the model in the table and the plot (info outlives close())
    for model, threads in models(args):
        first = first or model
        results += run(model, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=threads, reps=args.reps,
                       compare=args.compare, rounds=args.rounds)
    assert first is not None
    results.sort(key=lambda r: r.test[:2] != "pp")  # pp rows first, as for one load
    print(json.dumps([r.as_dict() for r in results], indent=1) if args.output == "json"
          else markdown(first, results))
    if args.plot:
        x = "n_gpu_layers" if args.n_gpu_layers and len(args.n_gpu_layers) > 1 else "threads"
        title = f"lamina bench: {first.info.desc} ({first.path.name})\n{system_info().cpu_model or 'unknown CPU'}"
        sys.stdout.flush()  # the table before the note, also when both go to one pipe
        print(f"plot: {plot.render(results, args.plot, x=x, title=title)}", file=sys.stderr)
    return 0
