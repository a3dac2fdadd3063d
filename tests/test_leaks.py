"""Loading, using and closing models and contexts many times leaks nothing (Linux: /proc RSS)."""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
from leaks import cycle, rss_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")


def test_rss_stays_flat_over_200_load_generate_close_cycles(tiny_path: Path) -> None:
    # one cycle maps the model (0.8 MiB), makes a KV cache, compute buffers and threadpools,
    # generates, saves the state and frees it all: a leak of any of them is > 200 x 100 KiB
    for _ in range(30):  # the allocator's pools and lazy initialisations settle first
        cycle(tiny_path, False, 512)
    gc.collect()
    before = rss_bytes()
    for _ in range(200):
        cycle(tiny_path, False, 512)
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 4 * 2**20, f"RSS grew {grown / 2**20:.2f} MiB over 200 cycles"
