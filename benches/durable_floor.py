#!/usr/bin/env python3
"""The floor of a durable store on this disk, without network or parsing (the ingest
target: parity with storescp, see BENCHMARKS.md): per instance, the spool's file-system steps alone:
write 525 KB (a 512x512 16-bit slice) to a new temp file, fdatasync, link it into the
series directory, fsync the directory, unlink the temp name. Interleaved with the same
steps without the two syncs (what DCMTK storescp does), and with what a write-ahead
journal would do instead: overwrite 525 KB of a segment file whose blocks were written and
synced beforehand, then fdatasync (no new inode, no directory entry, no allocation to
commit: a design sketched in BENCHMARKS.md, not built).

    python3 benches/durable_floor.py DIR [INSTANCES] [ROUNDS]

DIR must be on the disk the spool would use (e.g. target/). storescu waits for each
C-STORE response before sending the next instance, so a receiver that answers only once
the instance is durable cannot be faster per instance than the durable column.
"""
import os, sys, time, statistics
root = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
data = os.urandom(525 * 1024)
def run(sync):
    d = os.path.join(root, f"s{sync}{time.time_ns()}"); os.makedirs(d + "/series"); os.makedirs(d + "/tmp")
    dfd = os.open(d + "/series", os.O_RDONLY)
    t0 = time.perf_counter()
    for i in range(n):
        tmp = f"{d}/tmp/{i}.part"; fin = f"{d}/series/{i}.dcm"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        if sync: os.fdatasync(fd)
        os.close(fd); os.link(tmp, fin)
        if sync: os.fsync(dfd)
        os.unlink(tmp)
    dt = time.perf_counter() - t0
    os.close(dfd)
    for sub in ("series", "tmp"):
        for f in os.listdir(f"{d}/{sub}"):
            os.unlink(f"{d}/{sub}/{f}")
        os.rmdir(f"{d}/{sub}")
    os.rmdir(d)
    return dt
def journal():
    path = os.path.join(root, f"j{time.time_ns()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    zeros = bytes(len(data))
    for _ in range(n):  # a recycled segment: its blocks exist and hold old bytes
        os.write(fd, zeros)
    os.fsync(fd)
    t0 = time.perf_counter()
    for i in range(n):
        os.pwrite(fd, data, i * len(data))
        os.fdatasync(fd)
    dt = time.perf_counter() - t0
    os.close(fd); os.unlink(path)
    return dt
fast, durable, journalled = [], [], []
for r in range(rounds):
    fast.append(run(False) / n * 1e3)
    durable.append(run(True) / n * 1e3)
    journalled.append(journal() / n * 1e3)
    print(f"round {r}: no sync {fast[-1]:.3f} ms/instance, durable {durable[-1]:.3f} ms/instance, "
          f"journal {journalled[-1]:.3f} ms/instance")
print(f"median of {rounds}: no sync {statistics.median(fast):.3f} ms, durable {statistics.median(durable):.3f} ms, "
      f"journal {statistics.median(journalled):.3f} ms per instance")
