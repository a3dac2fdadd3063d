#!/usr/bin/env python3
"""Offload checks on real GPUs (device machine): auto fit, capped memory, multi-GPU splits.

usage: python ci/gpu_offload.py auto MODEL          # auto on one GPU, then with memory held elsewhere
       python ci/gpu_offload.py two MODEL           # layer / row / tensor_split across two GPUs
"""
from __future__ import annotations

import subprocess
import sys
import time

import lamina

PROMPT = "The three primary colors are"


def greedy(model: lamina.Model, n: int = 64) -> list[int]:
    with model.context(n_ctx=1024) as ctx:
        t0 = time.perf_counter()
        c = ctx.complete(PROMPT, max_tokens=n, ignore_eos=True)
        print(f"  greedy {n} tokens: {c.tokens_per_s:.1f} t/s ({time.perf_counter() - t0:.2f} s)")
        return list(c.tokens)


def show(title: str, model: lamina.Model) -> None:
    print(f"== {title}\n{model.offload}", flush=True)


def auto(path: str) -> None:
    gpus = [d for d in lamina.devices() if d.kind == "gpu"]
    print("devices:", [(d.name, d.memory_free >> 20, d.memory_total >> 20) for d in gpus])
    m = lamina.Model(path, devices=[gpus[0].name])
    show("auto, nothing held", m)
    ref = greedy(m)
    m.close()
    est_all = lamina.Model(path, devices=[gpus[0].name], n_gpu_layers="all").offload.per_device[0]
    print(f"  all layers need {est_all.bytes / 2**20:.0f} MiB on {est_all.device}")
    for keep in (1024 + int(est_all.bytes / 2**20 * 0.6), 1024 + int(est_all.bytes / 2**20 * 0.3)):
        hold = subprocess.Popen([sys.executable, "ci/gpu_hold.py", str(keep)], stdout=subprocess.PIPE, text=True)
        try:
            print(" ", hold.stdout.readline().strip() if hold.stdout else "")
            m = lamina.Model(path, devices=[gpus[0].name])
            show(f"auto with only {keep} MiB free (another process holds the rest; default margin 1024 MiB)", m)
            print("  same tokens as full offload:", greedy(m) == ref)
            m.close()
            try:
                lamina.Model(path, devices=[gpus[0].name], n_gpu_layers="all").context(n_ctx=1024).complete("x", max_tokens=4)
                print("  n_gpu_layers='all' also loaded")
            except lamina.LaminaError as exc:
                print(f"  n_gpu_layers='all' raised {type(exc).__name__}: {exc}")
        finally:
            hold.kill()
            hold.wait()
    m = lamina.Model(path, devices=[gpus[0].name], memory_limit={gpus[0].name: int(est_all.bytes * 0.5)})
    show(f"auto with memory_limit={int(est_all.bytes * 0.5) >> 20} MiB", m)
    m.close()
    # out of memory on purpose: the weights (load) and then a large KV cache (context) cannot fit
    keep = int(est_all.bytes / 2**20 * 0.5)
    hold = subprocess.Popen([sys.executable, "ci/gpu_hold.py", str(keep)], stdout=subprocess.PIPE, text=True)
    try:
        print(" ", hold.stdout.readline().strip() if hold.stdout else "")
        for what, kw, n_ctx in (("load, all layers", dict(n_gpu_layers="all"), 1024),
                                ("context of 131072 tokens, 4 layers", dict(n_gpu_layers=4), 131072)):
            try:
                with lamina.Model(path, devices=[gpus[0].name], **kw) as m, m.context(n_ctx=n_ctx) as c:
                    c.complete("x", max_tokens=4)
                print(f"== out of memory on purpose ({what}, {keep} MiB free): it fitted")
            except lamina.OutOfMemoryError as exc:
                print(f"== out of memory on purpose ({what}, {keep} MiB free): OutOfMemoryError "
                      f"device={exc.device!r} bytes={exc.bytes}\n  {exc}")
        m = lamina.Model(path, devices=[gpus[0].name])
        show(f"then auto, same {keep} MiB free, same process", m)
        greedy(m, 16)
    finally:
        hold.kill()
        hold.wait()


def two(path: str) -> None:
    gpus = [d.name for d in lamina.devices() if d.kind == "gpu"]
    print("gpus:", gpus)
    one = lamina.Model(path, n_gpu_layers="all", devices=[gpus[0]])
    show("one GPU", one)
    ref = greedy(one)
    one.close()
    for title, kw in (("layer split", dict(split_mode="layer")),
                      ("row split", dict(split_mode="row")),
                      ("tensor split (tensor parallel)", dict(split_mode="tensor")),
                      ("layer split, tensor_split [3, 1]", dict(split_mode="layer", tensor_split=[3, 1])),
                      ("auto, two GPUs", dict())):
        try:
            m = lamina.Model(path, n_gpu_layers="all" if title != "auto, two GPUs" else "auto", **kw)
        except (lamina.LaminaError, ValueError) as exc:
            print(f"== {title}: {type(exc).__name__}: {exc}")
            continue
        show(title, m)
        print("  identical greedy tokens to one GPU:", greedy(m) == ref)
        m.close()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="  llama.cpp %(levelname)s: %(message)s")
    {"auto": auto, "two": two}[sys.argv[1]](sys.argv[2])
