"""`lamina bench --parallel` and `lamina bench --draft`: batched and speculative generation side by
side with llama.cpp's own programs built from the same pinned source (lamina/bin/).

--parallel 1,4,8 (llama-batched-bench): for each level pl, one context of n_seq_max=pl sequences,
n_ctx = pl*(npp+ntg) (each sequence its own stream: llama.cpp's default, -no-kvu, and lamina's
KV(unified=False); llama.cpp pads both the same), n_batch = pl*npp so every prompt goes in one
step, the same n_ubatch, threads, flash attention and K/V types on both sides. Each side warms up
with one 16-token decode, then runs -r repetitions in the same context:
  llama-batched-bench: pl prompts of npp random tokens, decoded in n_batch chunks, then ntg decodes
      of pl random tokens each (a logits row per token, nothing sampled). pp t/s = pl*npp over the
      prompt decodes + synchronize; tg t/s = pl*ntg over the generation loop. It makes its context
      with llama_init_from_model and attaches no threadpool, so with -t > 1 ggml starts and joins
      a disposable pool in every decode; lamina's contexts keep their pools (as llama-bench and
      llama.cpp's other programs do). With -t 1 that difference is gone.
  lamina: pl requests of npp random tokens (BOS first) submitted to the native Batcher loop
      (lamina.Batcher's engine, run in this thread) before its first step, greedy, ignore_eos,
      max_tokens = ntg+1: the first token is sampled from the prompt step, the other ntg each from
      a generation step that decodes one token of every sequence. The engine's own counters time
      its steps: decode, then sampling each sequence's token (argmax over the vocabulary: on the
      host, or, with the output layer on a GPU, in the graph by llama.cpp's backend sampling, as
      lamina.Batcher and generate_batch do); a step with any prompt token is a prompt step. pp t/s = n_prompt_tokens / t_prompt_steps;
      tg t/s = n_gen_tokens / t_gen_steps (detokenization and publishing fall outside, as building
      the batch does; llama's loop times its batch building).

--draft SMALL.gguf | ngram (llama-speculative-simple): greedy generation of -n tokens after a fixed
prompt (--prompt TEXT; the default is a code file to copy, which n-gram lookup can draft from).
Both sides run llama.cpp's common/speculative: with a model, draft-simple (up to --draft-max
tokens, 16, kept while the draft model gives them at least --draft-p-min, 0.75); with `ngram`,
ngram-simple (the tokens that followed the last --ngram-n tokens, 3, where they occurred before;
up to --draft-max). Same n_ctx, n_batch, n_ubatch, threads, K/V types, flash attention, placement.
  llama-speculative-simple: decodes the prompt but its last token, then times the loop that
      decodes [last token, draft...] on the target, samples, accepts, and drafts again, until more
      than n tokens came: "decoded N tokens in T seconds"; acceptance n_accept / n_drafted.
  lamina: ctx.generate(prompt, max_tokens=n, ignore_eos=True, draft=lamina.Draft(...)), and the
      same without a draft in the same context, each from an empty cache after a short warm-up.
      tg t/s = n_generated / t_gen_us, timed from after the whole prompt's decode (and the
      draft's view of it) to the last token: the first token is sampled from the prompt's logits,
      so llama's region holds one target decode more (the prompt's last token, with the first
      draft), about 1/n of the steps at no acceptance. Acceptance n_accepted / n_drafted;
      speedup = lamina's spec tg / lamina's plain tg.
Greedy text is the same on both sides only up to the first near tie: a verification batch gets
its logits from other kernels than a one-token decode (llama-speculative-simple's own output
parts from llama.cpp's plain greedy output on a quantized model too), and after that the sides
draft from different text. Read the ratio next to both acceptance rates.

Rounds alternate llama.cpp's program and lamina (-r repetitions each, --rounds N); medians of all
samples, and with -r 1 --rounds N the median of the paired (back to back) ratios too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from .. import _native, tools
from .args import models
from ..context import Context
from ..errors import LaminaError
from ..model import Model
from ..params import BENCH_KV, KV
from ..sampling import Sampler
from ..speculative import Draft
from ..threads import Threads
from ..tokenizer import ModelInfo

FlashAttn = Literal["auto", "on", "off"]
FLASH = {"auto": "auto", "on": True, "off": False}  # -fa value -> Context(flash_attn=)
NGRAM_LOOKUP = 3  # llama.cpp's ngram-simple lookup length (--spec-ngram-simple-size-n) for --draft ngram
WARMUP_TOKENS = 16  # llama-batched-bench's warm-up decode
_log = logging.getLogger("lamina")

CODE = '''import json
from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 1

    def total(self) -> float:
        return self.price * self.quantity


class Cart:
    def __init__(self) -> None:
        self.items: list[Item] = []

    def add(self, name: str, price: float, quantity: int = 1) -> None:
        self.items.append(Item(name, price, quantity))

    def remove(self, name: str) -> None:
        self.items = [item for item in self.items if item.name != name]

    def total(self) -> float:
        return sum(item.total() for item in self.items)

    def to_json(self) -> str:
        return json.dumps([item.__dict__ for item in self.items], indent=2)


def main() -> None:
    cart = Cart()
    cart.add("apple", 0.5, 6)
    cart.add("bread", 2.25)
    cart.add("milk", 1.1, 2)
    cart.remove("bread")
    print(cart.total())
    print(cart.to_json())
'''
# a file and the start of a copy of it: what follows repeats the prompt, so n-grams find drafts
DEFAULT_PROMPT = ("Here is a Python file:\n\n" + CODE + "\nThe same file again, unchanged:\n\n"
                  + CODE.split("\n")[0] + "\n")


def sample_stats(name: str, xs: list[float]) -> dict[str, Any]:
    """name_median_ts, name_mean_ts, name_sd_ts and name_samples_ts of one side's t/s samples (0 without any)."""
    med, mean, sd = (statistics.median(xs), statistics.fmean(xs), statistics.pstdev(xs)) if xs else (0.0, 0.0, 0.0)
    return {f"{name}_median_ts": med, f"{name}_mean_ts": mean, f"{name}_sd_ts": sd, f"{name}_samples_ts": xs}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of the ratios of samples run back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


def spread(d: dict[str, Any], name: str, digits: int = 1) -> str:
    """'median ± sd' of one side's t/s samples in an as_dict() row."""
    return f"{d[f'{name}_median_ts']:.{digits}f} ± {d[f'{name}_sd_ts']:.{digits}f}"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule and one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def random_prompt(rng: np.random.Generator, info: ModelInfo, n: int) -> npt.NDArray[np.int32]:
    """n random token ids, BOS first when the model adds one (the prompts of llama.cpp's benches)."""
    toks = rng.integers(0, info.n_vocab, n, dtype=np.int32)
    if info.add_bos:
        toks[0] = info.bos
    return toks


def placement_args(model: Model, draft: bool = False, sep: str = ",") -> list[str]:
    """llama.cpp common-argument flags that place a model as lamina did: same devices, same layer count
    (-ngld/-devd for a draft; llama-bench takes the devices with sep "/")."""
    ngl, dev = ("-ngld", "-devd") if draft else ("-ngl", "-dev")
    if not model.offload.gpu:
        return [ngl, "0", dev, "none"]
    return [ngl, str(model.offload.layers_effective), dev, sep.join(model.offload.devices)]


def context_args(kv: KV, flash_attn: FlashAttn, threads: int) -> list[str]:
    """llama.cpp common-argument flags for lamina's K/V types, flash attention and threads."""
    out = ["-t", str(threads), "-tb", str(threads), "-fa", flash_attn, "-ctk", kv.type_k, "-ctv", kv.type_v]
    if kv.swa_full:
        out.append("--swa-full")
    if not kv.offload:
        out.append("-nkvo")
    return out


def require_tool(name: str) -> None:
    if tools.path(name) is None:
        raise FileNotFoundError(f"{name} is not shipped in this lamina build: build with "
                                f"-Ccmake.define.LAMINA_EXTRA_TOOLS={name} (';' between several)")


T = TypeVar("T")


def run_tool(name: str, args: list[str], parse: Callable[[str, str], T], attempts: int = 3) -> T:
    """Run a program and parse (stdout, stderr). The pinned llama.cpp's programs log through a
    worker thread that is never joined (common_log_main leaks it: llama.cpp issue 22142), so a
    run that ends right after its last lines can exit before they are written; such a run (its
    summary missing) is run again, up to ``attempts`` times."""
    for attempt in range(attempts):
        res = tools.run(name, args, capture_output=True, errors="replace")  # generated text: any bytes
        if res.returncode != 0:
            raise LaminaError(f"{name} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
        try:
            return parse(res.stdout, res.stderr)
        except ValueError as exc:
            if attempt + 1 == attempts:
                raise LaminaError(f"{name}: {exc}") from None
            _log.info("%s: %s; running it again", name, exc)
    raise AssertionError("unreachable")


def placement_of(model: Model) -> dict[str, Any]:
    """What -ngl asked (the config's value: an inert one is left out of the load, so not
    off.layers_requested) and where the layers went."""
    off = model.offload
    return {"n_gpu_layers": model.config["n_gpu_layers"] if model.config is not None else off.layers_requested,
            "layers_offloaded": off.layers_effective if off.gpu else 0, "devices": list(off.devices) if off.gpu else []}


# -- --parallel: llama-batched-bench -----------------------------------------------------------
@dataclass
class ParallelResult:
    pl: int
    n_prompt: int
    n_gen: int
    threads: int
    n_batch: int
    n_ubatch: int
    flash_attn: str
    reps_per_round: int = 1
    n_ctx: int = 0  # lamina's context, as llama.cpp sized it
    n_kv_max: int = 0  # llama-batched-bench's context (its n_kv_max)
    lamina_pp: list[float] = field(default_factory=list)
    lamina_tg: list[float] = field(default_factory=list)
    llama_pp: list[float] = field(default_factory=list)
    llama_tg: list[float] = field(default_factory=list)
    lamina_step_us: list[float] = field(default_factory=list)  # per generation step: the whole step
    lamina_sample_us: list[float] = field(default_factory=list)  # ... and its part after the decode returned
    lamina_reused: list[float] = field(default_factory=list)  # llama.cpp graphs reused per generation step
    placed: dict[str, Any] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.reps_per_round == 1 and len(self.lamina_tg) == len(self.llama_tg) > 1

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"test": f"parallel pp{self.n_prompt}+tg{self.n_gen}", "pl": self.pl,
                             "n_prompt": self.n_prompt, "n_gen": self.n_gen, "threads": self.threads,
                             "n_ctx": self.n_ctx, "n_kv_max": self.n_kv_max, "n_batch": self.n_batch,
                             "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn, "kv_unified": BENCH_KV.unified,
                             **self.placed}
        for name in ("lamina_pp", "llama_pp", "lamina_tg", "llama_tg"):
            d.update(sample_stats(name, getattr(self, name)))
        if self.lamina_step_us:
            d["lamina_gen_step_us_median"] = statistics.median(self.lamina_step_us)
            d["lamina_gen_sample_us_median"] = statistics.median(self.lamina_sample_us)
            d["lamina_graphs_reused_per_step"] = statistics.median(self.lamina_reused)
        for t in ("pp", "tg"):
            d[f"{t}_ratio"] = d[f"lamina_{t}_median_ts"] / d[f"llama_{t}_median_ts"]
            if self.paired:
                d[f"{t}_paired_ratio_median"] = paired_ratio(getattr(self, f"lamina_{t}"), getattr(self, f"llama_{t}"))
        return d


def parallel_shape(pl: int, n_prompt: int, n_gen: int, n_ubatch: int) -> tuple[int, int, int]:
    """(n_ctx, n_batch, n_ubatch) for pl sequences: room for every prompt and its tokens, and
    every prompt in one batch (so no step mixes prompt and generation tokens)."""
    n_batch = pl * n_prompt
    return pl * (n_prompt + n_gen), n_batch, min(n_ubatch, n_batch)


def lamina_parallel(model: Model, pl: int, n_prompt: int, n_gen: int, threads: int, reps: int, *,
                    n_ubatch: int = 512, flash_attn: FlashAttn = "auto", kv: KV = BENCH_KV,
                    seed: int = 0, backend_sampling: bool | None = None
                    ) -> tuple[int, list[tuple[float, float, float, float, float]]]:
    """(the context's n_ctx, [(pp t/s, tg t/s, us per generation step, us of it after the decode
    returned, graphs reused per generation step)] per repetition) through the Batcher's engine.
    backend_sampling None: lamina.Batcher's choice (on when the output layer is on a GPU)."""
    n_ctx, n_batch, n_ub = parallel_shape(pl, n_prompt, n_gen, n_ubatch)
    rng = np.random.default_rng(seed)
    keys = ("n_prompt_tokens", "t_prompt_steps_us", "n_gen_tokens", "t_gen_steps_us", "n_gen_steps", "t_gen_sample_us",
            "graphs_reused")
    out = []
    with model.context(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ub, n_seq_max=pl,
                       threads=Threads(n=threads, batch=threads), kv=kv, flash_attn=FLASH[flash_attn]) as ctx:
        engine = _native.Batcher(ctx.native, 0, model.output_on_gpu if backend_sampling is None else backend_sampling)
        try:
            greedy = Sampler().params(ctx.n_ctx)
            engine.submit(random_prompt(rng, model.info, WARMUP_TOKENS), greedy, 1, True, [])
            engine.run(True)
            for _ in range(reps):
                before = engine.stats()
                reqs = [engine.submit(random_prompt(rng, model.info, n_prompt), greedy, n_gen + 1, True, [])
                        for _ in range(pl)]
                engine.run(True)  # every request queued before the first step: one prompt step
                for r in reqs:
                    r.raise_if_failed()
                after = engine.stats()
                d = {k: int(after[k]) - int(before[k]) for k in keys}
                if d["n_prompt_tokens"] != pl * n_prompt or d["n_gen_tokens"] != pl * n_gen:
                    raise LaminaError(f"the Batcher decoded {d['n_prompt_tokens']} prompt and {d['n_gen_tokens']} "
                                       f"generation tokens, not {pl * n_prompt} and {pl * n_gen}: the steps were not "
                                       "the ones llama-batched-bench times")
                out.append((d["n_prompt_tokens"] / (d["t_prompt_steps_us"] / 1e6),
                            d["n_gen_tokens"] / (d["t_gen_steps_us"] / 1e6),
                            d["t_gen_steps_us"] / d["n_gen_steps"], d["t_gen_sample_us"] / d["n_gen_steps"],
                            d["graphs_reused"] / d["n_gen_steps"]))
        finally:
            engine.close()
        return ctx.n_ctx, out


def parse_batched_bench(text: str) -> list[dict[str, Any]]:
    """llama-batched-bench --output-format jsonl: one dict per (pp, tg, pl) run."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    for r in rows:
        for k in ("pl", "pp", "tg", "speed_pp", "speed_tg", "n_kv_max"):
            if k not in r:
                raise ValueError(f"llama-batched-bench row without {k!r}: {r}")
    return rows


def run_batched_bench(model: Model, pl: int, n_prompt: int, n_gen: int, threads: int, reps: int, *, n_ubatch: int = 512,
                      flash_attn: FlashAttn = "auto", kv: KV = BENCH_KV) -> tuple[int, list[tuple[float, float]]]:
    """(n_kv_max, [(pp t/s, tg t/s)] per repetition): llama-batched-bench with lamina's settings,
    one process per level (its context sized for pl sequences as lamina's is), -r as -npl pl,pl,..."""
    n_ctx, n_batch, n_ub = parallel_shape(pl, n_prompt, n_gen, n_ubatch)
    args = ["-m", str(Path(model.path).resolve()), "-c", str(n_ctx), "-b", str(n_batch), "-ub", str(n_ub),
            "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", ",".join([str(pl)] * reps),
            "-kvu" if kv.unified else "-no-kvu", *context_args(kv, flash_attn, threads), *placement_args(model),
            "--output-format", "jsonl"]

    def parse(stdout: str, stderr: str) -> list[dict[str, Any]]:
        rows = [r for r in parse_batched_bench(stdout) if r["pl"] == pl]
        if len(rows) != reps:
            raise ValueError(f"{len(rows)} result rows for pl={pl}, not {reps} (a run it skips does not fit its "
                             f"context); its log: {stderr.strip()[-500:]!r}")
        return rows

    rows = run_tool("llama-batched-bench", args, parse)
    return int(rows[0]["n_kv_max"]), [(float(r["speed_pp"]), float(r["speed_tg"])) for r in rows]


def run_parallel(model: Model, *, levels: list[int], n_prompt: int = 128, n_gen: int = 128, threads: list[int],
                 reps: int = 1, rounds: int = 1, n_ubatch: int = 512,
                 flash_attn: FlashAttn = "auto", backend_sampling: bool | None = None) -> list[ParallelResult]:
    require_tool("llama-batched-bench")
    results = {(pl, th): ParallelResult(pl, n_prompt, n_gen, th, *parallel_shape(pl, n_prompt, n_gen, n_ubatch)[1:],
                                        flash_attn, reps_per_round=reps, placed=placement_of(model))
               for th in threads for pl in levels}
    for rnd in range(rounds):
        for (pl, th), res in results.items():
            res.n_kv_max, llama = run_batched_bench(model, pl, n_prompt, n_gen, th, reps, n_ubatch=n_ubatch,
                                                    flash_attn=flash_attn)
            res.n_ctx, ours = lamina_parallel(model, pl, n_prompt, n_gen, th, reps, n_ubatch=n_ubatch,
                                              flash_attn=flash_attn, seed=rnd, backend_sampling=backend_sampling)
            res.llama_pp += [p for p, _ in llama]
            res.llama_tg += [t for _, t in llama]
            for name, values in zip(("lamina_pp", "lamina_tg", "lamina_step_us", "lamina_sample_us", "lamina_reused"),
                                    zip(*ours)):  # lamina_parallel's tuples, field by field
                getattr(res, name).extend(values)
    return list(results.values())


def parallel_markdown(model: Model, results: list[ParallelResult]) -> str:
    paired = bool(results) and all(r.paired for r in results)
    head = ["model", "threads", "pl", "n_ctx", "lamina pp t/s", "llama pp t/s", "pp ratio", "lamina tg t/s",
            "llama tg t/s", "tg ratio"] + (["pp paired", "tg paired"] if paired else [])
    rows = []
    for r in results:
        d = r.as_dict()
        rows.append([model.info.desc, str(r.threads), str(r.pl), str(r.n_ctx), spread(d, "lamina_pp"),
                     spread(d, "llama_pp"), f"{d['pp_ratio']:.3f}", spread(d, "lamina_tg"), spread(d, "llama_tg"),
                     f"{d['tg_ratio']:.3f}"]
                    + ([f"{d['pp_paired_ratio_median']:.3f}", f"{d['tg_paired_ratio_median']:.3f}"] if paired else []))
    r0 = results[0]
    lines = md_table(head, rows)
    lines += ["", f"pp{r0.n_prompt} per sequence, then tg{r0.n_gen}; aggregate t/s over all pl sequences; "
              f"n_batch = pl*{r0.n_prompt}, n_ubatch <= {max(r.n_ubatch for r in results)}, "
              f"flash_attn {r0.flash_attn}, "
              f"per-sequence KV streams; medians of {len(r0.lamina_tg)} runs; llama = llama-batched-bench; "
              f"device: {', '.join(r0.placed.get('devices') or ['CPU'])}",
              "", "lamina's generation step, median µs: " + "; ".join(
                  f"pl {d['pl']}: {d.get('lamina_gen_step_us_median', 0):.0f}, of it "
                  f"{d.get('lamina_gen_sample_us_median', 0):.0f} after the decode call returned (the wait "
                  f"for the device, sampling), llama.cpp's graph reused in "
                  f"{100 * d.get('lamina_graphs_reused_per_step', 0):.0f}% of steps"
                  for d in (r.as_dict() for r in results))]
    return "\n".join(lines)


# -- --draft: llama-speculative-simple ---------------------------------------------------------
@dataclass
class DraftResult:
    draft: str  # the draft model's file name, or "ngram"
    n_gen: int
    threads: int
    n_max: int
    p_min: float
    ngram_n: int = NGRAM_LOOKUP
    reps_per_round: int = 1
    n_prompt: int = 0  # lamina's prompt tokens
    llama_n_prompt: int = 0  # llama-speculative-simple's ("encoded N tokens")
    lamina_plain: list[float] = field(default_factory=list)
    lamina_spec: list[float] = field(default_factory=list)
    llama_spec: list[float] = field(default_factory=list)
    lamina_drafted: int = 0
    lamina_accepted: int = 0
    llama_drafted: int = 0
    llama_accepted: int = 0
    placed: dict[str, Any] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.reps_per_round == 1 and len(self.lamina_spec) == len(self.llama_spec) > 1

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"test": f"draft tg{self.n_gen}", "draft": self.draft, "n_gen": self.n_gen,
                             "threads": self.threads, "draft_max": self.n_max,
                             **({"ngram_n": self.ngram_n} if self.draft == "ngram" else {"draft_p_min": self.p_min}),
                             "n_prompt": self.n_prompt, "llama_n_prompt": self.llama_n_prompt, **self.placed}
        for name in ("lamina_plain", "lamina_spec", "llama_spec"):
            d.update(sample_stats(name, getattr(self, name)))
        d["speedup"] = d["lamina_spec_median_ts"] / d["lamina_plain_median_ts"]
        d["ratio"] = d["lamina_spec_median_ts"] / d["llama_spec_median_ts"]
        d.update({"lamina_n_drafted": self.lamina_drafted, "lamina_n_accepted": self.lamina_accepted,
                  "lamina_acceptance": self.lamina_accepted / self.lamina_drafted if self.lamina_drafted else 0.0,
                  "llama_n_drafted": self.llama_drafted, "llama_n_accepted": self.llama_accepted,
                  "llama_acceptance": self.llama_accepted / self.llama_drafted if self.llama_drafted else 0.0})
        if self.paired:
            d["paired_ratio_median"] = paired_ratio(self.lamina_spec, self.llama_spec)
        if self.reps_per_round == 1 and len(self.lamina_spec) == len(self.lamina_plain) > 1:
            d["paired_speedup_median"] = paired_ratio(self.lamina_spec, self.lamina_plain)
        return d


_SPEC_LINES = {
    "encoded": re.compile(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
    "decoded": re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s"),
    "n_drafted": re.compile(r"n_drafted\s*=\s*(\d+)"),
    "n_accept": re.compile(r"n_accept\s*=\s*(\d+)"),
}


def parse_speculative(log: str) -> dict[str, float]:
    """llama-speculative-simple's summary: n_prompt, n_predict, t_s, tg t/s, n_drafted, n_accept."""
    found = {k: rx.search(log) for k, rx in _SPEC_LINES.items()}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise ValueError(f"llama-speculative-simple printed no {', '.join(missing)} line: {log.strip()[-800:]}")
    enc, dec, nd, na = (found[k] for k in ("encoded", "decoded", "n_drafted", "n_accept"))
    assert enc and dec and nd and na
    # its speed, not N / T: T is printed in ms, the speed from the time in us
    return {"n_prompt": int(enc.group(1)), "n_predict": int(dec.group(1)), "t_s": float(dec.group(2)),
            "tg_ts": float(dec.group(3)), "n_drafted": int(nd.group(1)), "n_accept": int(na.group(1))}


def spec_n_ctx(n_prompt: int, n_gen: int, n_max: int) -> int:
    """Room for the prompt, the tokens and llama-speculative-simple's overshoot (it stops once more
    than n tokens came, the last step's whole accepted draft included)."""
    return n_prompt + n_gen + 2 * n_max + 16


def run_speculative(model: Model, draft: Model | None, prompt: str, n_gen: int, threads: int, *, n_ctx: int,
                    n_batch: int, n_ubatch: int, n_max: int = 16, p_min: float = 0.75, ngram_n: int = NGRAM_LOOKUP,
                    flash_attn: FlashAttn = "auto", kv: KV = BENCH_KV) -> dict[str, float]:
    """One llama-speculative-simple run with lamina's settings (draft None: ngram-simple)."""
    args = ["-m", str(Path(model.path).resolve()), "-p", prompt, "-n", str(n_gen), "--temp", "0", "-c", str(n_ctx),
            "-b", str(n_batch), "-ub", str(n_ubatch), *context_args(kv, flash_attn, threads), *placement_args(model)]
    if draft is None:
        args += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(ngram_n),
                 "--spec-ngram-simple-size-m", str(n_max)]
    else:
        args += ["--spec-type", "draft-simple", "-md", str(Path(draft.path).resolve()), "-td", str(threads),
                 "-tbd", str(threads), "--spec-draft-n-max", str(n_max), "--spec-draft-p-min", str(p_min),
                 "-ctkd", kv.type_k, "-ctvd", kv.type_v, *placement_args(draft, draft=True)]
    return run_tool("llama-speculative-simple", args, lambda out, err: parse_speculative(err + "\n" + out))


def lamina_generations(ctx: Context, prompt: str, n_gen: int, reps: int,
                       draft: Draft | None = None) -> list[dict[str, Any]]:
    """reps greedy generations of n_gen tokens from an empty cache after a short warm-up: their stats."""
    out = []
    for r in range(reps + 1):
        ctx.kv_clear()
        gen = ctx.generate(prompt, max_tokens=n_gen if r else min(n_gen, 8), ignore_eos=True, draft=draft)
        for _ in gen:
            pass
        if r:
            s = gen.stats
            if s["n_generated"] != n_gen or s["t_gen_us"] <= 0:
                raise LaminaError(f"lamina generated {s['n_generated']} tokens in {s['t_gen_us']} us, not {n_gen}")
            out.append(s)
    return out


def load_draft(model: Model, path: str) -> Model:
    """The draft model, placed as the target was asked to be (its -ngl, or on the CPU)."""
    if not model.on_gpu:
        return Model(path, gpu=False)
    asked = model.config["n_gpu_layers"] if model.config is not None else None
    return Model(path, n_gpu_layers=asked if asked is not None else "auto")


def run_draft(model: Model, *, draft: str, prompt: str = DEFAULT_PROMPT, n_gen: int = 128, threads: list[int],
              reps: int = 1, rounds: int = 1, n_max: int = 16, p_min: float = 0.75, ngram_n: int = NGRAM_LOOKUP,
              n_ubatch: int = 512, flash_attn: FlashAttn = "auto") -> list[DraftResult]:
    require_tool("llama-speculative-simple")
    with contextlib.ExitStack() as stack:  # closes the Draft's contexts, then the draft model
        draft_model = None if draft == "ngram" else stack.enter_context(load_draft(model, draft))
        # both sides run llama.cpp's common/speculative: draft-simple with a model, else ngram-simple
        spec = Draft(n_max=n_max, ngram_n=ngram_n) if draft_model is None else Draft(draft_model, n_max=n_max,
                                                                                      p_min=p_min)
        stack.callback(spec.close)
        n_prompt = len(model.tokenize(prompt))
        n_ctx = spec_n_ctx(n_prompt, n_gen, n_max)
        name = "ngram" if draft_model is None else Path(draft).name
        results = [DraftResult(name, n_gen, th, n_max, p_min, ngram_n, reps_per_round=reps, n_prompt=n_prompt,
                               placed=placement_of(model)) for th in threads]
        for _ in range(rounds):
            for res in results:
                with model.context(n_ctx=n_ctx, n_ubatch=n_ubatch, threads=Threads(n=res.threads, batch=res.threads),
                                   kv=BENCH_KV, flash_attn=FLASH[flash_attn]) as ctx:
                    for _ in range(reps):
                        s = run_speculative(model, draft_model, prompt, n_gen, res.threads, n_ctx=n_ctx,
                                            n_batch=int(ctx.params["n_batch"]), n_ubatch=int(ctx.params["n_ubatch"]),
                                            n_max=n_max, p_min=p_min, ngram_n=ngram_n, flash_attn=flash_attn)
                        res.llama_spec.append(s["tg_ts"])
                        res.llama_drafted += int(s["n_drafted"])
                        res.llama_accepted += int(s["n_accept"])
                        res.llama_n_prompt = int(s["n_prompt"])
                    for st in lamina_generations(ctx, prompt, n_gen, reps, spec):
                        res.lamina_spec.append(st["tokens_per_s"])
                        res.lamina_drafted += int(st["n_drafted"])
                        res.lamina_accepted += int(st["n_accepted"])
                    res.lamina_plain += [st["tokens_per_s"] for st in lamina_generations(ctx, prompt, n_gen, reps)]
        return results


def draft_markdown(model: Model, results: list[DraftResult]) -> str:
    paired = bool(results) and all(r.paired for r in results)
    head = ["model", "draft", "threads", "lamina plain t/s", "lamina spec t/s", "speedup", "lamina accept",
            "llama spec t/s", "llama accept", "ratio"] + (["paired ratio"] if paired else [])
    rows = []
    for r in results:
        d = r.as_dict()
        rows.append([model.info.desc, r.draft, str(r.threads), spread(d, "lamina_plain"), spread(d, "lamina_spec"),
                     f"{d['speedup']:.2f}x", f"{d['lamina_acceptance']:.1%}", spread(d, "llama_spec"),
                     f"{d['llama_acceptance']:.1%}", f"{d['ratio']:.3f}"]
                    + ([f"{d['paired_ratio_median']:.3f}"] if paired else []))
    r0 = results[0]
    lines = md_table(head, rows)
    lines += ["", f"greedy tg{r0.n_gen} after a {r0.n_prompt}-token prompt; draft up to {r0.n_max} tokens"
              + (f" after a {r0.ngram_n}-token match" if r0.draft == "ngram" else f", p_min {r0.p_min}")
              + f"; speedup = lamina spec / lamina plain; ratio = lamina spec / llama-speculative-simple; "
              f"medians of {len(r0.lamina_spec)} runs; device: {', '.join(r0.placed.get('devices') or ['CPU'])}"]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------
N = TypeVar("N", int, float)


def ranged(parse: Callable[[str], N], lo: N, hi: N, expected: str) -> Callable[[str], N]:
    """An argparse type: the text parsed into [lo, hi], else ArgumentTypeError("expected <expected>, got 'text'")."""
    def check(text: str) -> N:
        with contextlib.suppress(ValueError):
            x = parse(text)
            if lo <= x <= hi:  # NaN fails too
                return x
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return check


def count(lo: int) -> Callable[[str], int]:
    """An argparse type: an int in [lo, 1,000,000]."""
    return ranged(int, lo, 1_000_000, f"an int >= {lo}")


def int_list(what: str, hi: int | None, bounds: str) -> Callable[[str], list[int]]:
    """An argparse type: a comma list of ints in [1, hi] (None: no bound); ArgumentTypeError("expected a comma
    list of <what>, got 'text'") for other text, and "<bounds>, got 'text'" for an int out of range."""
    def parse(value: str) -> list[int]:
        try:
            out = [int(v) for v in value.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, got {value!r}") from None
        if any(v < 1 or hi is not None and v > hi for v in out):
            raise argparse.ArgumentTypeError(f"{bounds}, got {value!r}")
        return out
    return parse


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batched and speculative generation against llama.cpp's programs")
    g.add_argument("--parallel", type=int_list("sequence counts, e.g. 1,4,8", 256, "sequence counts are 1..256"),
                   default=None, metavar="PL,PL,...",  # 256: LLAMA_MAX_SEQ
                   help="sequences decoded together, e.g. 1,4,8,16,32: lamina's Batcher against llama-batched-bench")
    g.add_argument("-npp", "--n-prompt-parallel", type=count(1), default=128, metavar="N",
                   help="--parallel: prompt tokens per sequence (128)")
    g.add_argument("-ntg", "--n-gen-parallel", type=count(1), default=128, metavar="N",
                   help="--parallel: generated tokens per sequence (128)")
    g.add_argument("-ub", "--ubatch-size", type=count(1), default=512, metavar="N",
                   help="--parallel/--draft: n_ubatch (512)")
    g.add_argument("-fa", "--flash-attn", choices=("auto", "on", "off"), default="auto")
    g.add_argument("--backend-sampling", choices=("auto", "on", "off"), default="auto",
                   help="--parallel: greedy tokens from llama.cpp's backend sampling (the argmax in the graph) or a "
                        "host argmax over the logits; auto: lamina.Batcher's choice (on with the output layer on a GPU)")
    g.add_argument("--draft", default=None, metavar="SMALL.gguf|ngram",
                   help="speculative decoding (greedy, -n tokens) with a draft model or n-gram lookup, against "
                        "llama-speculative-simple; plain generation is measured too")
    g.add_argument("--prompt", default=None, metavar="TEXT", help="--draft: the prompt (default: a code file to copy)")
    g.add_argument("--draft-max", type=count(1), default=16, metavar="N", help="--draft: most tokens per draft (16)")
    g.add_argument("--draft-p-min", type=ranged(float, 0.0, 1.0, "a probability 0..1"), default=0.75,
                   metavar="P", help="--draft: least draft-model probability (0.75)")
    g.add_argument("--ngram-n", type=count(1), default=NGRAM_LOOKUP, metavar="N",
                   help=f"--draft ngram: tokens matched to find a draft ({NGRAM_LOOKUP})")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.parallel and args.draft:
        p.error("--parallel and --draft are separate runs: give one")
    if (args.parallel or args.draft) and (args.plot or args.compare):
        p.error("--parallel and --draft always run llama.cpp's program and draw no plot: "
                "--compare and --plot are for the pp/tg mode")
    if args.draft and args.n_gen < 1:
        p.error("--draft generates -n tokens: give -n 1 or more")
    if args.draft and args.draft != "ngram" and not Path(args.draft).is_file():
        p.error(f"--draft: no such file {args.draft!r} (a GGUF, or 'ngram')")


def cmd_bench(args: argparse.Namespace) -> int:
    """`lamina bench --parallel ...` / `--draft ...`: each model load (-ngl list) and thread count."""
    check_args(args.bench_parser, args)
    results: list[ParallelResult | DraftResult] = []
    first: Model | None = None
    for model, threads in models(args):
        first = first or model
        if args.parallel:
            results += run_parallel(model, levels=args.parallel, n_prompt=args.n_prompt_parallel,
                                    n_gen=args.n_gen_parallel, threads=threads, reps=args.reps, rounds=args.rounds,
                                    n_ubatch=args.ubatch_size, flash_attn=args.flash_attn,
                                    backend_sampling={"auto": None, "on": True, "off": False}[args.backend_sampling])
        else:
            results += run_draft(model, draft=args.draft, prompt=args.prompt or DEFAULT_PROMPT, n_gen=args.n_gen,
                                 threads=threads, reps=args.reps, rounds=args.rounds, n_max=args.draft_max,
                                 p_min=args.draft_p_min, ngram_n=args.ngram_n, n_ubatch=args.ubatch_size,
                                 flash_attn=args.flash_attn)
    assert first is not None
    if args.output == "json":
        print(json.dumps([r.as_dict() for r in results], indent=1))
    elif args.parallel:
        print(parallel_markdown(first, [r for r in results if isinstance(r, ParallelResult)]))
    else:
        print(draft_markdown(first, [r for r in results if isinstance(r, DraftResult)]))
    return 0
