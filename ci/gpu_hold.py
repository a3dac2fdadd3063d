#!/usr/bin/env python3
"""Hold GPU memory from another process so that only KEEP_MIB stay free (for the "auto" fit test).

usage: python ci/gpu_hold.py KEEP_MIB [device]   prints "held <MiB>" and sleeps until killed.
"""
import ctypes
import glob
import sys
import time

keep = int(sys.argv[1]) * 2**20
dev = int(sys.argv[2]) if len(sys.argv) > 2 else 0
paths = ["libcudart.so"] + sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*")) + \
    sorted(glob.glob("/usr/local/cuda*/targets/*/lib/libcudart.so*"))
for p in paths:
    try:
        rt = ctypes.CDLL(p)
        break
    except OSError:
        continue
else:
    sys.exit("no libcudart found")
assert rt.cudaSetDevice(dev) == 0
free, total = ctypes.c_size_t(), ctypes.c_size_t()
assert rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0
size = free.value - keep
ptr = ctypes.c_void_p()
rc = rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(size))
assert rc == 0, rc
rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
print(f"held {size / 2**20:.0f} MiB; free now {free.value / 2**20:.0f} MiB", flush=True)
while True:
    time.sleep(60)
