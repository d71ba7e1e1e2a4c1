#!/usr/bin/env python3
"""The benchmarks' live writer: random 64 KiB writes into a 2 GiB file (argv[1]) at argv[3] MB/s,
fsync'd every second; the total bytes written so far go to the file argv[2] (replaced atomically).
Used by scripts/bench-scale and scripts/bench-coordinator."""
import os, random, sys, time
path, counter, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]) * 1e6
size = 2 << 30
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, size)
rnd, buf, written, t0, last_sync = random.Random(1), os.urandom(1 << 20), 0, time.time(), time.time()
while True:
    off = rnd.randrange(size // 65536) * 65536
    start = rnd.randrange(len(buf) - 65536)
    os.pwrite(fd, buf[start:start + 65536], off)
    written += 65536
    due = t0 + written / rate
    now = time.time()
    if due > now:
        time.sleep(due - now)
    if now - last_sync > 1:
        os.fsync(fd); last_sync = now
        with open(counter + ".tmp", "w") as f: f.write(str(written))
        os.replace(counter + ".tmp", counter)
