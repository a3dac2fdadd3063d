#!/usr/bin/env python3
"""Exit with lamina work running in daemon threads, many times: no crash, no hang, and how long the
exit takes (from the main thread's last line to the process's end).

usage: python ci/exit_runs.py [-n 50] [case ...]    (cases: tests/test_context_safety.py's EXIT_CASES)
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from test_context_safety import EXIT_CASES  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("cases", nargs="*", default=sorted(EXIT_CASES))
    a = ap.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "m.gguf", n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=1024)
        for case in a.cases:
            code = textwrap.dedent(f"""
                import threading, time, lamina
                TESTS, DIR = {str(TESTS)!r}, {tmp!r}
                m = lamina.Model({str(model)!r}, gpu=False)
                ctx = m.context(n_ctx=512)
            """) + textwrap.dedent(EXIT_CASES[case]) + textwrap.dedent("""
                threading.Thread(target=work, daemon=True).start()
                time.sleep(0.3)
                print("exiting", time.monotonic(), flush=True)
            """)
            exits, failures = [], []
            for _ in range(a.n):
                try:
                    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
                except subprocess.TimeoutExpired:
                    failures.append("hang (60 s)")
                    continue
                end = time.monotonic()
                words = r.stdout.split()
                noise = [ln for ln in r.stderr.splitlines() if "terminate" in ln or "Traceback" in ln]
                if r.returncode != 0 or len(words) != 2 or words[0] != "exiting" or noise:
                    failures.append(f"rc {r.returncode}: {r.stderr[-300:]!r}")
                    continue
                exits.append(end - float(words[1]))
            bad += len(failures)
            if exits:
                print(f"{case}: {len(exits)}/{a.n} clean; exit took median {statistics.median(exits) * 1000:.0f} ms, "
                      f"max {max(exits) * 1000:.0f} ms; over 1 s: {sum(e > 1 for e in exits)}")
            for f in failures[:3]:
                print(f"{case}: FAILED {f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
