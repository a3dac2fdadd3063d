"""Command-line flags the subcommands share (model, threads, sampling) and the config they make:
model.yml < LAMINA_* environment < the flags given."""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any, Iterator

from ..config import Config, Setting, load_config
from ..model import Model
from ..models import default_model_path
from ..params import NGL, parse_ngl
from .progress import load_bar


def ngl(value: str) -> NGL:
    try:
        return parse_ngl(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: the Gemma 3 270M package)")
    p.add_argument("--config", default=None, help="model.yml with settings (then LAMINA_* env, then these flags)")
    p.add_argument("--no-gpu", action="store_true", help="keep everything on the CPU")
    p.add_argument("-ngl", "--n-gpu-layers", type=ngl, default=None, help="int, 'all' or 'auto' (default: auto)")


def add_thread_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=int, default=None, help="generation threads (default: physical cores)")
    p.add_argument("-tb", "--threads-batch", type=int, default=None, help="prompt threads (default: logical CPUs)")
    p.add_argument("--cpus", default=None, help="pin threads to CPUs: '0-3,8' or a hex mask '0xff'")
    p.add_argument("--cpu-strict", action="store_true", help="one thread per listed CPU")
    p.add_argument("--prio", default=None, choices=("low", "normal", "medium", "high", "realtime"))
    p.add_argument("--poll", type=int, default=None, help="0 (sleep) .. 100 (spin) while waiting for work (50)")


def add_sampling_args(p: argparse.ArgumentParser, n_predict: int) -> None:
    g = p.add_argument_group("generation (default: the config's, else llama.cpp's CLI defaults)")
    g.add_argument("-n", "--n-predict", type=int, default=None, help=f"tokens to generate (-1: no limit; {n_predict})")
    g.add_argument("--temp", type=float, default=None, help="temperature (0.8); 0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="(40; 0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="(0.95; 1 = off)")
    g.add_argument("--min-p", type=float, default=None, help="(0.05; 0 = off)")
    g.add_argument("--repeat-penalty", type=float, default=None, help="(1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="(-1: random; the seed used is printed)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="generate past end-of-generation tokens")
    g.add_argument("--ctx-shift", action="store_true", default=None, help="when the context fills, drop the older "
                   "half and go on (models whose cache can shift)")


# command-line flag -> lamina setting name
FLAGS = {"n_gpu_layers": "n_gpu_layers", "threads": "threads", "threads_batch": "threads_batch", "cpus": "cpus",
          "ctx_size": "n_ctx", "prio": "priority", "poll": "poll", "n_predict": "max_tokens", "temp": "temperature",
          "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repeat_penalty": "repeat_penalty", "seed": "seed",
          "stop": "stop", "ignore_eos": "ignore_eos", "ctx_shift": "ctx_shift"}


def config_from_args(args: argparse.Namespace, *, strict: bool = False) -> Config:
    """model.yml < LAMINA_* environment < the flags given on the command line."""
    flags: dict[str, Any] = {}
    if getattr(args, "model", None):
        flags["model"] = args.model
    if getattr(args, "no_gpu", False):
        flags["gpu"] = False
    for flag, name in FLAGS.items():
        if getattr(args, flag, None) is not None:
            flags[name] = getattr(args, flag)
    if getattr(args, "cpu_strict", False):
        flags["cpu_strict"] = True
    cfg = load_config(getattr(args, "config", None), strict=strict, **flags)
    if cfg["model"] is None:  # the default model, without reading (and warning about) the file again
        cfg = replace(cfg, settings={**cfg.settings, "model": Setting(str(default_model_path()), "default")})
    return cfg


def load_model(args: argparse.Namespace) -> Model:
    cfg = config_from_args(args)
    return Model.from_config(cfg, progress=load_bar(f"loading {os.path.basename(cfg['model'])}"))


def models(args: argparse.Namespace) -> Iterator[tuple[Model, list[int]]]:
    """The model as run/chat load it (--config, LAMINA_* and the flags), once per -ngl value
    (lamina bench sweeps them), each closed before the next loads, with the thread counts to run.
    -t stays out of the config: in bench it is a list to sweep (without it, the config's threads)."""
    sweep, ngls = args.threads, args.n_gpu_layers
    for ngl in ngls or [None]:
        args.threads, args.n_gpu_layers = None, ngl
        try:
            model = load_model(args)
        finally:
            args.threads, args.n_gpu_layers = sweep, ngls
        try:
            assert model.config is not None
            config_threads = model.config.threads()  # checked even when -t replaces it
            yield model, sweep or [config_threads.resolve()[0]]
        finally:
            model.close()
