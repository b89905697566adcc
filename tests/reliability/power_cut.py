#!/usr/bin/env python3
"""Power cuts, not just SIGKILL: the spool and the outbox on a FUSE file system that
forgets everything that was not fsynced.

A script, not a CI test (it needs /dev/fuse, root or a FUSE mount permission, libfuse2
and fusepy, and takes minutes). See docs/RELIABILITY.md, "Power cut".

SIGKILL leaves the page cache intact, so the kill tests of tests/faults.rs prove the
order of operations, not that the fsyncs make acknowledged data survive a power cut. Here
the daemon's spool_dir and alert.outbox_dir live on a small in-memory FUSE file system
(this file, `--serve-fs`) that models POSIX durability strictly:

- every file has its current data and its durable data; fsync or fdatasync of the file
  makes the current data durable (nothing else does: not close, not rename, not link);
- every directory has its current entries and its durable entries (name -> inode:
  files, links, subdirectories); fsync of the directory (FUSE `fsyncdir`) makes the
  current entries durable, i.e. creations, links, renames and unlinks in it;
  a new directory starts with no durable entries, and exists after a cut only if the
  entry in its parent was made durable;
- a power cut (control socket command `cut`) reverts every directory reachable from the
  root through durable entries to its durable entries and every file to its durable data;
  inodes no longer reachable vanish. The file system then answers EIO to everything
  until `on` (the machine is off: the daemon is killed meanwhile, so nothing it does
  after the cut lands on "disk").

It is mounted with direct_io and zero attr/entry/negative timeouts so that the kernel
keeps nothing stale after a revert; `--self-test` checks that (and the model) before a
run trusts it: data written without fsync is gone after a cut, a name linked without a
directory fsync is gone, with the directory fsync it stays, renames and unlinks follow
the same rule, a new directory whose parent was not fsynced vanishes with its contents.

The run: `cspine-triage serve` (CSPINE_BIN, default target/release/cspine-triage) with a
real mosquitto and a paho subscriber (tests/python/alert_sub.py); a few synthetic studies
(`cspine-triage synth --matrix 256`) sent one association per study by DCMTK
/usr/bin/storescu. At N random moments (seed printed, --seed replays the draws; where they
land depends on timing) the file system is cut and the daemon SIGKILLed at once (cut
first: nothing the daemon does after it reaches "disk"), then the daemon restarted and
the scanner re-sends what it got no Success for. Asserted after every cut: every instance
storescu got Success for is in the spool, its pixel data the one sent. At the end: every
series' result of all its instances reaches the subscriber under the id docs/ALERTS.md
documents, and the outbox drains. Printed per cut: the aim, what was acknowledged, what
survived, what the cut reverted, and the stages in progress (read from the daemon's log).

Install (not part of .ci/run):

    apt-get install -y libfuse2        # fusepy loads libfuse.so.2 (Debian 12: libfuse2)
    pip install fusepy==3.0.1
    apt-get install -y dcmtk mosquitto # /usr/bin/storescu, mosquitto; pip install pydicom paho-mqtt

Commands (as root, from the repository root):

    python3 tests/reliability/power_cut.py --self-test
    CSPINE_BIN=$PWD/target/release/cspine-triage nice -n 5 python3 tests/reliability/power_cut.py \
        --cuts 10 [--seed S] [--studies 5]
"""
import argparse
import errno
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- the file system


class Inode:
    __slots__ = ("ino", "kind", "mode", "data", "ddata", "entries", "dentries",
                 "target", "nlink", "atime", "mtime", "ctime")

    def __init__(self, ino, kind, mode):
        self.ino = ino
        self.kind = kind  # "f", "d" or "l"
        self.mode = mode
        self.data = bytearray()  # current data (files)
        self.ddata = b""  # durable data (files)
        self.entries = {}  # current entries (directories): name -> Inode
        self.dentries = {}  # durable entries
        self.target = ""  # symlinks (durable with their entry)
        self.nlink = 0
        now = time.time()
        self.atime = self.mtime = self.ctime = now


def serve_fs(mountpoint, control):
    """Mounts the model on `mountpoint` (foreground) and serves `cut`, `on`, `stats` on
    the Unix socket `control` (one JSON line back per command line)."""
    from fuse import FUSE, FuseOSError, Operations

    lock = threading.RLock()

    class PowerCutFS(Operations):
        use_ns = True
        # hard_remove: ops on an open, unlinked file come with a NULL path (we use fh).
        flag_nullpath_ok = 1

        def __init__(self):
            self.next_ino = 2
            self.root = Inode(1, "d", stat.S_IFDIR | 0o755)
            self.root.nlink = 2
            self.handles = {}
            self.next_fh = 1
            self.frozen = False
            self.counts = {"fsync": 0, "fsyncdir": 0, "cuts": 0}

        # -- helpers
        def __call__(self, op, *args):
            with lock:
                if self.frozen and op not in ("release", "releasedir", "flush", "destroy"):
                    raise FuseOSError(errno.EIO)
                return getattr(self, op)(*args)

        def new(self, kind, mode):
            ino = Inode(self.next_ino, kind, mode)
            self.next_ino += 1
            return ino

        def resolve(self, path):
            node = self.root
            for part in [p for p in path.split("/") if p]:
                if node.kind != "d" or part not in node.entries:
                    raise FuseOSError(errno.ENOENT)
                node = node.entries[part]
            return node

        def parent(self, path):
            head, _, name = path.rstrip("/").rpartition("/")
            d = self.resolve(head or "/")
            if d.kind != "d":
                raise FuseOSError(errno.ENOTDIR)
            return d, name

        def node(self, path, fh):
            if fh and fh in self.handles:
                return self.handles[fh]
            if path is None:
                raise FuseOSError(errno.EBADF)
            return self.resolve(path)

        def handle(self, node):
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = node
            return fh

        # -- power
        def cut(self):
            names_lost = names_back = files_reverted = bytes_lost = 0
            seen = set()
            before = set()

            def walk_current(d):
                for child in d.entries.values():
                    if id(child) not in before:
                        before.add(id(child))
                        if child.kind == "d":
                            walk_current(child)
            walk_current(self.root)
            stack = [self.root]
            seen.add(id(self.root))
            while stack:
                d = stack.pop()
                names_lost += sum(1 for n, c in d.entries.items() if d.dentries.get(n) is not c)
                names_back += sum(1 for n, c in d.dentries.items() if d.entries.get(n) is not c)
                d.entries = dict(d.dentries)
                for child in d.entries.values():
                    if id(child) in seen:
                        continue
                    seen.add(id(child))
                    if child.kind == "d":
                        stack.append(child)
                    elif child.kind == "f":
                        if bytes(child.data) != child.ddata:
                            files_reverted += 1
                            bytes_lost += abs(len(child.data) - len(child.ddata))
                        child.data = bytearray(child.ddata)
            # Link counts from the surviving tree.
            stack = [self.root]
            counts = {}
            done = set()
            while stack:
                d = stack.pop()
                if id(d) in done:
                    continue
                done.add(id(d))
                for child in d.entries.values():
                    counts[id(child)] = counts.get(id(child), 0) + 1
                    if child.kind == "d":
                        stack.append(child)
            stack = [self.root]
            done = set()
            while stack:
                d = stack.pop()
                if id(d) in done:
                    continue
                done.add(id(d))
                for child in d.entries.values():
                    child.nlink = 2 if child.kind == "d" else counts[id(child)]
                    if child.kind == "d":
                        stack.append(child)
            self.handles.clear()
            self.frozen = True
            self.counts["cuts"] += 1
            return {"names_lost": names_lost, "names_back": names_back,
                    "files_reverted": files_reverted,
                    "inodes_vanished": len(before - seen), "bytes_lost": bytes_lost}

        def power_on(self):
            self.frozen = False
            return {}

        # -- operations
        def getattr(self, path, fh=None):
            n = self.node(path, fh)
            size = len(n.data) if n.kind == "f" else (len(n.target) if n.kind == "l" else 4096)
            return {"st_mode": n.mode, "st_ino": n.ino, "st_nlink": max(n.nlink, 1),
                    "st_size": size, "st_uid": 0, "st_gid": 0, "st_blksize": 4096,
                    "st_blocks": (size + 511) // 512,
                    "st_atime": int(n.atime * 1e9), "st_mtime": int(n.mtime * 1e9),
                    "st_ctime": int(n.ctime * 1e9)}

        def access(self, path, amode):
            self.resolve(path)
            return 0

        def statfs(self, path):
            used = 0
            stack = [self.root]
            seen = set()
            while stack:
                d = stack.pop()
                for c in d.entries.values():
                    if id(c) in seen:
                        continue
                    seen.add(id(c))
                    if c.kind == "d":
                        stack.append(c)
                    else:
                        used += len(c.data)
            blocks = 8 * 1024 * 1024 * 1024 // 4096
            free = blocks - used // 4096
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": free,
                    "f_bavail": free, "f_files": 1 << 20, "f_ffree": (1 << 20) - len(seen),
                    "f_favail": (1 << 20) - len(seen), "f_namemax": 255}

        def readdir(self, path, fh):
            d = self.node(path, fh)
            return [".", ".."] + list(d.entries)

        def opendir(self, path):
            d = self.resolve(path)
            if d.kind != "d":
                raise FuseOSError(errno.ENOTDIR)
            return self.handle(d)

        def releasedir(self, path, fh):
            self.handles.pop(fh, None)
            return 0

        def fsyncdir(self, path, datasync, fh):
            d = self.node(path, fh)
            d.dentries = dict(d.entries)
            self.counts["fsyncdir"] += 1
            return 0

        def mkdir(self, path, mode):
            d, name = self.parent(path)
            if name in d.entries:
                raise FuseOSError(errno.EEXIST)
            n = self.new("d", stat.S_IFDIR | (mode & 0o7777))
            n.nlink = 2
            d.entries[name] = n
            d.mtime = time.time()
            return 0

        def rmdir(self, path):
            d, name = self.parent(path)
            n = d.entries.get(name)
            if n is None:
                raise FuseOSError(errno.ENOENT)
            if n.kind != "d":
                raise FuseOSError(errno.ENOTDIR)
            if n.entries:
                raise FuseOSError(errno.ENOTEMPTY)
            del d.entries[name]
            return 0

        def create(self, path, mode, fi=None):
            d, name = self.parent(path)
            n = d.entries.get(name)
            if n is None:
                n = self.new("f", stat.S_IFREG | (mode & 0o7777))
                n.nlink = 1
                d.entries[name] = n
                d.mtime = time.time()
            return self.handle(n)

        def open(self, path, flags):
            n = self.resolve(path)
            if n.kind == "d":
                raise FuseOSError(errno.EISDIR)
            if flags & os.O_TRUNC:
                n.data = bytearray()
            return self.handle(n)

        def read(self, path, size, offset, fh):
            n = self.node(path, fh)
            return bytes(n.data[offset:offset + size])

        def write(self, path, data, offset, fh):
            n = self.node(path, fh)
            if offset > len(n.data):
                n.data.extend(b"\0" * (offset - len(n.data)))
            n.data[offset:offset + len(data)] = data
            n.mtime = time.time()
            return len(data)

        def truncate(self, path, length, fh=None):
            n = self.node(path, fh)
            if length < len(n.data):
                del n.data[length:]
            else:
                n.data.extend(b"\0" * (length - len(n.data)))
            return 0

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            self.handles.pop(fh, None)
            return 0

        def fsync(self, path, datasync, fh):
            n = self.node(path, fh)
            n.ddata = bytes(n.data)
            self.counts["fsync"] += 1
            return 0

        def unlink(self, path):
            d, name = self.parent(path)
            n = d.entries.get(name)
            if n is None:
                raise FuseOSError(errno.ENOENT)
            if n.kind == "d":
                raise FuseOSError(errno.EISDIR)
            del d.entries[name]
            n.nlink -= 1
            return 0

        def link(self, target, source):
            # `target` is the new name of the file at `source`.
            n = self.resolve(source)
            if n.kind == "d":
                raise FuseOSError(errno.EPERM)
            d, name = self.parent(target)
            if name in d.entries:
                raise FuseOSError(errno.EEXIST)
            d.entries[name] = n
            n.nlink += 1
            return 0

        def symlink(self, target, source):
            d, name = self.parent(target)
            if name in d.entries:
                raise FuseOSError(errno.EEXIST)
            n = self.new("l", stat.S_IFLNK | 0o777)
            n.target = source
            n.nlink = 1
            d.entries[name] = n
            return 0

        def readlink(self, path):
            return self.resolve(path).target

        def rename(self, old, new):
            od, oname = self.parent(old)
            n = od.entries.get(oname)
            if n is None:
                raise FuseOSError(errno.ENOENT)
            nd, nname = self.parent(new)
            existing = nd.entries.get(nname)
            if existing is n:
                return 0
            if existing is not None:
                if existing.kind == "d":
                    if n.kind != "d":
                        raise FuseOSError(errno.EISDIR)
                    if existing.entries:
                        raise FuseOSError(errno.ENOTEMPTY)
                elif n.kind == "d":
                    raise FuseOSError(errno.ENOTDIR)
                existing.nlink -= 1
            del od.entries[oname]
            nd.entries[nname] = n
            return 0

        def chmod(self, path, mode):
            n = self.resolve(path)
            n.mode = (n.mode & ~0o7777) | (mode & 0o7777)
            return 0

        def chown(self, path, uid, gid):
            return 0

        def utimens(self, path, times=None):
            n = self.resolve(path)
            if times:
                n.atime, n.mtime = times[0] / 1e9, times[1] / 1e9
            return 0

    fs = PowerCutFS()

    def control_server():
        if os.path.exists(control):
            os.unlink(control)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(control)
        srv.listen(4)
        while True:
            conn, _ = srv.accept()
            with conn, conn.makefile("rw") as f:
                for line in f:
                    cmd = line.strip()
                    with lock:
                        if cmd == "cut":
                            reply = fs.cut()
                        elif cmd == "on":
                            reply = fs.power_on()
                        elif cmd == "stats":
                            reply = dict(fs.counts, frozen=fs.frozen)
                        else:
                            reply = {"error": f"unknown command {cmd!r}"}
                    f.write(json.dumps(reply) + "\n")
                    f.flush()

    threading.Thread(target=control_server, daemon=True).start()
    FUSE(fs, mountpoint, foreground=True, nothreads=False, direct_io=True,
         attr_timeout=0, entry_timeout=0, negative_timeout=0, ac_attr_timeout=0,
         hard_remove=True, big_writes=True, max_write=131072, use_ino=True,
         fsname="powercut", subtype="powercut")


class Fs:
    """The FUSE process, seen from the harness."""

    def __init__(self, work):
        self.mnt = Path(work) / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.sock = str(Path(work) / "control.sock")
        self.log = open(Path(work) / "fs.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-fs", str(self.mnt), "--control", self.sock],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not (os.path.ismount(self.mnt) and os.path.exists(self.sock)):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"FUSE file system did not mount: see {work}/fs.log:\n"
                                 + (Path(work) / "fs.log").read_text())
            time.sleep(0.05)
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(self.sock)
        self.f = self.conn.makefile("rw")

    def command(self, cmd):
        self.f.write(cmd + "\n")
        self.f.flush()
        return json.loads(self.f.readline())

    def cut(self):
        return self.command("cut")

    def on(self):
        return self.command("on")

    def stats(self):
        return self.command("stats")

    def close(self):
        try:
            self.conn.close()
        except OSError:
            pass
        subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------- self-test


def fsync_path(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(p, data, sync, datasync=False):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)


def read(p):
    with open(p, "rb") as f:
        return f.read()


def self_test(work):
    fs = Fs(work)
    m = fs.mnt
    checks = []

    def check(what, cond):
        checks.append((what, bool(cond)))
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")

    def cut():
        fs.cut()
        fs.on()

    try:
        # A durable directory to work in.
        os.mkdir(m / "d")
        fsync_path(m)
        big = os.urandom(300_000)  # several FUSE write requests
        # 1. data written without fsync is gone (the name was durable, with empty data).
        write_file(m / "d" / "a", b"", sync=True)
        fsync_path(m / "d")
        write_file(m / "d" / "a", big, sync=False)
        check("unsynced data readable before the cut", read(m / "d" / "a") == big)
        st = os.stat(m / "d" / "a")
        cut()
        check("write without fsync: data gone after the cut (size 0, read empty)",
              os.stat(m / "d" / "a").st_size == 0 and read(m / "d" / "a") == b"" and st.st_size == len(big))
        # 2. fsync makes data durable; a later overwrite without fsync reverts to it.
        write_file(m / "d" / "a", big, sync=True)
        with open(m / "d" / "a", "r+b") as f:
            f.write(b"X" * 1000)
        check("overwrite visible before the cut", read(m / "d" / "a")[:1000] == b"X" * 1000)
        cut()
        check("fsynced data survives, unsynced overwrite reverted", read(m / "d" / "a") == big)
        # fdatasync counts as fsync for the data.
        write_file(m / "d" / "a", b"datasync", sync=True, datasync=True)
        cut()
        check("fdatasync makes data durable", read(m / "d" / "a") == b"datasync")
        # 3. write + fsync + link without directory fsync: the name is gone.
        write_file(m / "d" / "t", big, sync=True)
        os.link(m / "d" / "t", m / "d" / "l")
        check("link visible before the cut", read(m / "d" / "l") == big)
        cut()
        check("write+fsync+link, no dir fsync: both names gone",
              not os.path.exists(m / "d" / "l") and not os.path.exists(m / "d" / "t"))
        # 4. with the directory fsync the name stays, with its data.
        write_file(m / "d" / "t", big, sync=True)
        os.link(m / "d" / "t", m / "d" / "l")
        fsync_path(m / "d")
        os.unlink(m / "d" / "t")  # unlinked after the fsync: comes back
        cut()
        check("write+fsync+link+dir fsync: the name stays with its data",
              os.path.exists(m / "d" / "l") and read(m / "d" / "l") == big)
        check("unlink without dir fsync: the name is back",
              os.path.exists(m / "d" / "t") and os.stat(m / "d" / "t").st_nlink == 2)
        os.unlink(m / "d" / "t")
        fsync_path(m / "d")
        cut()
        check("unlink + dir fsync: gone", not os.path.exists(m / "d" / "t"))
        # 5. link without fsync of the data: the name survives, the data does not.
        write_file(m / "d" / "u", big, sync=False)
        os.link(m / "d" / "u", m / "d" / "u2")
        fsync_path(m / "d")
        cut()
        check("dir fsync without file fsync: name stays, data empty",
              os.path.exists(m / "d" / "u2") and read(m / "d" / "u2") == b"")
        # 6. rename: old name back without dir fsync, new name with it.
        write_file(m / "d" / "r.tmp", b"entry", sync=True)
        fsync_path(m / "d")
        os.rename(m / "d" / "r.tmp", m / "d" / "r")
        cut()
        check("rename without dir fsync: the old name is back, the new one gone",
              os.path.exists(m / "d" / "r.tmp") and not os.path.exists(m / "d" / "r"))
        os.rename(m / "d" / "r.tmp", m / "d" / "r")
        fsync_path(m / "d")
        cut()
        check("rename + dir fsync: the new name stays",
              read(m / "d" / "r") == b"entry" and not os.path.exists(m / "d" / "r.tmp"))
        # 7. a new directory whose parent was not fsynced vanishes with its contents.
        os.makedirs(m / "d" / "s1" / "s2")
        write_file(m / "d" / "s1" / "s2" / "f", b"deep", sync=True)
        fsync_path(m / "d" / "s1" / "s2")
        fsync_path(m / "d" / "s1")
        check("nested file readable before the cut", read(m / "d" / "s1" / "s2" / "f") == b"deep")
        cut()
        check("mkdir without parent fsync: the directory and its contents vanish",
              not os.path.exists(m / "d" / "s1"))
        os.makedirs(m / "d" / "s1" / "s2")
        write_file(m / "d" / "s1" / "s2" / "f", b"deep", sync=True)
        fsync_path(m / "d" / "s1" / "s2")
        fsync_path(m / "d" / "s1")
        fsync_path(m / "d")
        cut()
        check("mkdir with every parent fsynced: the file stays",
              read(m / "d" / "s1" / "s2" / "f") == b"deep")
        # 8. the kernel caches nothing stale: a cached lookup and size are re-read.
        write_file(m / "d" / "c", b"", sync=True)
        fsync_path(m / "d")
        fd = os.open(m / "d" / "c", os.O_RDWR)
        os.write(fd, b"cached?")
        os.close(fd)
        for _ in range(3):
            os.stat(m / "d" / "c")
            read(m / "d" / "c")
        cut()
        check("no stale size or data from the kernel after a cut",
              os.stat(m / "d" / "c").st_size == 0 and read(m / "d" / "c") == b"")
        check("the kernel lists the reverted directory",
              sorted(os.listdir(m / "d")) == sorted(["a", "l", "u", "u2", "r", "s1", "c"]))
        # 9. frozen after a cut until power returns.
        fs.cut()
        try:
            os.stat(m / "d" / "a")
            frozen = False
        except OSError as e:
            frozen = e.errno == errno.EIO
        fs.on()
        check("after a cut and before power-on the file system answers EIO", frozen)
        st = fs.stats()
        check(f"fsync and fsyncdir reached the file system ({st['fsync']} and {st['fsyncdir']})",
              st["fsync"] > 0 and st["fsyncdir"] > 0)
    finally:
        fs.close()
    failed = [w for w, ok in checks if not ok]
    print(f"self-test: {len(checks) - len(failed)}/{len(checks)} checks passed")
    return not failed


# ---------------------------------------------------------------- the run

STAGES = ["start-up", "receiving", "quiet period", "volume building", "inference",
          "outbox commit", "spool mark", "publish"]
TOPIC_PREFIX = "cspine/bench/box/"


def bin_path():
    return os.environ.get("CSPINE_BIN", str(ROOT / "target/release/cspine-triage"))


class Source:
    def __init__(self, path, sop, series, study):
        self.path, self.sop, self.series, self.study = path, sop, series, study


def make_studies(work, n, seed):
    """`n` synthetic studies (256x256, 1.5 mm slices, explicit VR LE): list of lists of
    Source, each in Instance Number order."""
    import pydicom
    studies = []
    for i in range(n):
        out = work / "studies" / str(i)
        fracture = ["C2", "none", "C5", "none", "C6"][i % 5]
        subprocess.run([bin_path(), "synth", str(out), "--count", "1", "--seed",
                        str(seed * 100 + i), "--fracture", fracture, "--matrix", "256",
                        "--transfer-syntax", "explicit", "--slice-thickness", "1.5"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files = sorted((out / "train_images").glob("*/*.dcm"), key=lambda p: int(p.stem))
        study = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            study.append(Source(f, ds.SOPInstanceUID, ds.SeriesInstanceUID,
                                ds.StudyInstanceUID))
        studies.append(study)
    return studies


def model_sha256():
    return json.loads((ROOT / "models/model.json").read_text())["sha256"]


def documented_id(sources, status):
    """docs/ALERTS.md: hex sha256 of "<Series Instance UID>\\n<model sha256>\\n<status>\\n
    <sorted SOP Instance UIDs, \\n-joined>"."""
    import hashlib
    series = sources[0].series
    assert all(s.series == series for s in sources)
    sops = sorted({s.sop for s in sources})
    text = f"{series}\n{model_sha256()}\n{status}\n" + "\n".join(sops)
    return hashlib.sha256(text.encode()).hexdigest()


def spooled(spool):
    """SOP Instance UID -> path of every finished instance in the spool."""
    out = {}
    if not spool.is_dir():
        return out
    for study in spool.iterdir():
        if study.name.startswith(".") or not study.is_dir():
            continue
        for series in study.iterdir():
            if not series.is_dir():
                continue
            for f in series.iterdir():
                if f.suffix == ".dcm":
                    out[f.stem] = f
    return out


def pixels(path):
    import pydicom
    return pydicom.dcmread(path).PixelData


def intact(source, in_spool):
    """The spool copy is the instance sent: same SOP Instance UID, same pixel data."""
    import pydicom
    try:
        ds = pydicom.dcmread(in_spool)
    except Exception as e:  # noqa: BLE001 (anything unreadable is damage)
        return f"unreadable: {e}"
    if ds.SOPInstanceUID != source.sop:
        return f"SOP Instance UID {ds.SOPInstanceUID}"
    if ds.PixelData != pixels(source.path):
        return "pixel data differs"
    return None


class Subscriber:
    """tests/python/alert_sub.py, its messages collected."""

    def __init__(self, port):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/python/alert_sub.py"), "--port", str(port),
             "--topic", TOPIC_PREFIX + "#"], stdout=subprocess.PIPE, text=True)
        self.messages = []
        self.subscribed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.subscribed.wait(30):
            raise SystemExit("subscriber did not subscribe")

    def _read(self):
        for line in self.proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "subscribed":
                self.subscribed.set()
            elif ev["event"] == "message":
                self.messages.append((ev["topic"], bytes.fromhex(ev["payload_hex"])))

    def results(self):
        return [json.loads(p) for t, p in list(self.messages) if t == TOPIC_PREFIX + "result"]

    def close(self):
        self.proc.kill()


class Scanner(threading.Thread):
    """Sends the studies one association each, in order (what is not acknowledged yet),
    until told to stop; records every Success from storescu's output. After a study it
    sent, it waits until the daemon's log (`log_path`) shows the study's series being
    analysed (15 s at most), then 0-1.5 s, so that the stream overlaps analyses without
    running far ahead of them (as tests/faults.rs does) and the cuts find work to hit."""

    def __init__(self, port, studies, acked, rng, log_path=None):
        super().__init__(daemon=True)
        self.port, self.studies, self.acked, self.rng = port, studies, acked, rng
        self.log_path = log_path
        self.stop = threading.Event()
        self.successes = 0  # in this scanner's life
        self.sending = False
        self.proc = None
        self.acked_now = []
        self.refused = []
        self.sent_everything = False

    def run(self):
        by_path = {str(s.path): s for st in self.studies for s in st}
        for study in self.studies:
            sent = False
            while not self.stop.is_set():
                todo = [s for s in study if s.sop not in self.acked]
                if not todo:
                    break
                sent = True
                self.sending = True
                self.proc = subprocess.Popen(
                    ["/usr/bin/storescu", "-v", "-aec", "CSPINE", "-aet", "CTSCANNER",
                     "127.0.0.1", str(self.port)] + [str(s.path) for s in todo],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                current = None
                for line in self.proc.stdout:
                    if line.startswith("I: Sending file: "):
                        current = line[len("I: Sending file: "):].strip()
                    elif line.startswith("I: Received Store Response ("):
                        status = line[len("I: Received Store Response ("):].strip().rstrip(")")
                        if status == "Success":
                            s = by_path[current]
                            self.acked[s.sop] = True
                            self.acked_now.append(s.sop)
                            self.successes += 1
                        else:
                            self.refused.append((current, status))
                self.proc.wait()
                self.sending = False
                if self.proc.returncode != 0 and not self.stop.is_set():
                    time.sleep(0.2)  # the daemon is starting or gone: a scanner retries
            if self.stop.is_set():
                return
            if not sent:
                continue
            deadline = time.time() + 15
            needle = f"analysing series {study[0].series}"
            while self.log_path and time.time() < deadline and not self.stop.is_set():
                if needle in self.log_path.read_text(errors="replace"):
                    break
                self.stop.wait(0.05)
            if self.stop.wait(self.rng.uniform(0, 1.5)):
                return
        self.sent_everything = True


def stages_at_cut(log, receiving):
    """The stages in progress at the cut, read from that run's log (as tests/faults.rs
    `stages_at_kill`, without the quiet period, which the log does not show)."""
    def message(line):
        return line.split("] ", 1)[1] if "] " in line else line

    def uid_after(text, pat):
        i = text.find(pat)
        if i < 0:
            return None
        rest = text[i + len(pat):]
        for sep in " :)(":
            rest = rest.split(sep)[0]
        return rest

    ready = False
    state, marks, unpublished, from_before = {}, {}, {}, 0
    for line in log.splitlines():
        msg = message(line)
        if msg == "ready":
            ready = True
        elif msg.startswith("series ") and " complete (" in msg:
            state[uid_after(msg, "series ")] = "volume building"
        elif uid_after(msg, ": analysing series "):
            state[uid_after(msg, ": analysing series ")] = "volume building"
        elif " inference starts" in msg:
            state[uid_after(msg, "series ")] = "inference"
        elif " model slices, " in msg:
            state[uid_after(msg, "series ")] = "outbox commit"
        elif " committed to the outbox as entry " in msg:
            s = uid_after(msg, ", series ")
            state.pop(s, None)
            marks[s] = marks.get(s, 0) + 1
            unpublished[uid_after(msg, "result ")] = s
        elif " is already waiting in the outbox" in msg:
            s = uid_after(msg, "(series ")
            state.pop(s, None)
            marks[s] = marks.get(s, 0) + 1
        elif msg.startswith("series ") and " is in the outbox): " in msg:
            s = uid_after(msg, "series ")
            marks[s] = marks.get(s, 0) - 1
        elif uid_after(msg, "cannot mark series "):
            s = uid_after(msg, "cannot mark series ")
            marks[s] = marks.get(s, 0) - 1
        elif " delivered: the broker acknowledged " in msg:
            if unpublished.pop(uid_after(msg, "result "), None) is None:
                from_before -= 1
        elif " result(s) from a previous run still to publish" in msg:
            from_before = int(uid_after(msg, ": "))
    if not ready:
        return ["start-up"]
    stages = ["receiving"] if receiving else []
    stages += list(state.values())
    stages += ["spool mark" for n in marks.values() if n > 0]
    stages += ["publish"] * (len(unpublished) + (from_before > 0))
    return sorted(set(stages), key=STAGES.index)


def write_config(work, mnt, dicom_port, mqtt_port, quiet):
    cfg = work / "config.toml"
    cfg.write_text(f"""
[dicom]
ae_title = "CSPINE"
bind = "127.0.0.1"
port = {dicom_port}
spool_dir = "{mnt}/spool"
[series]
quiet_period_secs = {quiet}
[inference]
model = "{ROOT}/models/model.json"
[alert]
mqtt_url = "mqtt://127.0.0.1:{mqtt_port}"
site = "bench"
device = "box"
outbox_dir = "{mnt}/outbox"
""")
    return cfg


def wait_line(log_path, needle, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if needle in log_path.read_text(errors="replace"):
                return True
        except OSError:
            pass
        time.sleep(0.002)
    return False


def run(work, args):
    sys.path.insert(0, str(ROOT / "benches"))
    from loopback import free_port, start_mosquitto, wait_port

    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 10**9
    print(f"power cut run: --seed {seed} (set it to replay the same draws), {args.cuts} cuts, "
          f"{args.studies} studies, binary {bin_path()}, work {work}")
    rng = random.Random(seed)
    t0 = time.time()
    studies = make_studies(work, args.studies, seed)
    every = [s for st in studies for s in st]
    series = {}
    for s in every:
        series.setdefault(s.series, []).append(s)
    print(f"{len(every)} instances in {len(series)} series "
          f"({', '.join(str(len(v)) for v in series.values())} instances)")
    fs = Fs(work)
    broker, mqtt_port = start_mosquitto(work)
    sub = Subscriber(mqtt_port)
    port = free_port()
    cfg = write_config(work, fs.mnt, port, mqtt_port, args.quiet_period)
    spool = fs.mnt / "spool"
    acked = {}
    lost_total = 0
    runs = []
    daemon = None
    try:
        for cut in range(1, args.cuts + 1):
            log_path = work / f"daemon-{cut}.log"
            logf = open(log_path, "w")
            daemon = subprocess.Popen([bin_path(), "serve", "--config", str(cfg)],
                                      stdout=logf, stderr=subprocess.STDOUT)
            scanner = Scanner(port, studies, acked, rng, log_path)
            draw = rng.random()
            if draw < 0.1:
                scanner.start()
                ms = rng.uniform(0, 400)
                time.sleep(ms / 1000)
                aim = f"{ms:.0f} ms after start-up began"
            else:
                wait_port(port, 120)
                scanner.start()
                if draw < 0.5:
                    k = rng.randint(0, 40)
                    deadline = time.time() + 30
                    while scanner.successes < k and scanner.is_alive() and time.time() < deadline:
                        time.sleep(0.001)
                    ms = rng.uniform(0, 12)
                    time.sleep(ms / 1000)
                    aim = f"{ms:.1f} ms after response {k}"
                else:
                    needle, span = rng.choice([
                        (": analysing series ", 150), (" inference starts", 700),
                        (" model slices, ", 10), (" committed to the outbox as entry ", 3),
                        (" delivered: the broker acknowledged ", 3)])
                    found = wait_line(log_path, needle, 15)
                    ms = rng.uniform(0, span)
                    time.sleep(ms / 1000)
                    aim = (f"{ms:.1f} ms after '{needle.strip()}'" if found
                           else f"'{needle.strip()}' not logged within 15 s")
            # The cut: the file system first (nothing later reaches "disk"), then SIGKILL.
            scanner.stop.set()
            reverted = fs.cut()
            daemon.send_signal(signal.SIGKILL)
            receiving = scanner.sending
            daemon.wait()
            scanner.join(120)
            logf.close()
            fs.on()
            log = log_path.read_text(errors="replace")
            stages = stages_at_cut(log, receiving)
            on_disk = spooled(spool)
            missing, damaged = [], []
            for s in every:
                if s.sop in acked:
                    if s.sop not in on_disk:
                        missing.append(s)
                    else:
                        why = intact(s, on_disk[s.sop])
                        if why:
                            damaged.append((s, why))
            unanswered = len([sop for sop in on_disk if sop not in acked])
            lost_total += len(missing) + len(damaged)
            runs.append({"cut": cut, "aim": aim, "stages": stages, "acked_run": len(scanner.acked_now),
                         "acked": len(acked), "lost": len(missing) + len(damaged), **reverted})
            print(f"cut {cut:2} ({aim}; in progress: {', '.join(stages) or 'nothing'}): "
                  f"{len(scanner.acked_now)} acknowledged in this run, {len(acked)}/{len(every)} "
                  f"in all; {len(acked) - len(missing)} in the spool after the cut "
                  f"(all re-read, {len(damaged)} damaged), "
                  f"{len(missing)} LOST; {unanswered} stored but unanswered; the cut dropped "
                  f"{reverted['names_lost']} names, brought back {reverted['names_back']}, "
                  f"reverted {reverted['files_reverted']} files' data")
            for s in missing[:10]:
                print(f"    LOST {s.sop} (series {s.series}): acknowledged, not in the spool")
            for s, why in damaged[:10]:
                print(f"    DAMAGED {s.sop}: {why}")
            if scanner.refused:
                print(f"    refused by the daemon (re-sent later): {len(scanner.refused)}")
            if missing or damaged:
                shutil.copy(log_path, work / f"lost-at-cut-{cut}.log")
        # The final start: send what is left, wait for every series' whole result.
        log_path = work / "daemon-final.log"
        logf = open(log_path, "w")
        daemon = subprocess.Popen([bin_path(), "serve", "--config", str(cfg)],
                                  stdout=logf, stderr=subprocess.STDOUT)
        wait_port(port, 120)
        scanner = Scanner(port, studies, acked, random.Random(0))
        scanner.rng = random.Random(0)
        scanner.run()  # in this thread, till everything is acknowledged
        last_response = time.time()
        assert scanner.sent_everything and len(acked) == len(every), "final send incomplete"
        final_missing = [s for s in every if s.sop not in spooled(spool)]
        expected = {name: {documented_id(srcs, st) for st in
                           ("positive", "negative", "indeterminate", "failed")}
                    for name, srcs in series.items()}
        deadline = time.time() + args.result_timeout
        got = {}
        while time.time() < deadline:
            ids = {r["id"]: r for r in sub.results()}
            got = {name: [i for i in ids if i in cands] for name, cands in expected.items()}
            if all(got.values()):
                break
            time.sleep(0.2)
        ids = {r["id"]: r for r in sub.results()}
        results_time = time.time() - last_response
        outbox = fs.mnt / "outbox"
        deadline = time.time() + 60
        while any(p.suffix == ".entry" for p in outbox.iterdir()) and time.time() < deadline:
            time.sleep(0.2)
        left = [p.name for p in outbox.iterdir() if p.suffix == ".entry"]
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        logf.close()
        whole = {name: v[0] for name, v in got.items() if v}
        failed = [name for name, i in whole.items() if ids[i]["status"] == "failed"]
        partial = [i for i, r in ids.items() if i not in whole.values()]
        copies, payloads = {}, {}
        for t, p in list(sub.messages):
            if t == TOPIC_PREFIX + "result":
                i = json.loads(p)["id"]
                copies[i] = copies.get(i, 0) + 1
                payloads.setdefault(i, set()).add(p)
        # Same id, other bytes: the same analysis done again after a cut between the outbox
        # commit and the spool mark (docs/ALERTS.md allows it; only `timings` may differ).
        redone = [i for i, ps in payloads.items() if len(ps) > 1]
        for i in redone:
            bodies = [json.loads(p) for p in payloads[i]]
            for b in bodies:
                b.pop("timings", None)
            assert all(b == bodies[0] for b in bodies), f"copies of {i} differ beyond timings"
        print(f"final start: {len(final_missing)} acknowledged instances missing from the "
              f"spool; results of every instance for {len(whole)}/{len(series)} series under "
              f"their documented ids ({results_time:.1f} s after the last response), "
              f"{len(failed)} failed, {len(partial)} other ids (partial results or other), "
              f"copies per id {sorted(copies.values())} ({len(redone)} ids with copies that differ "
              f"in `timings` only), outbox entries left {len(left)}")
        stage_counts = {st: sum(st in r["stages"] for r in runs) for st in STAGES}
        print("cuts per stage in progress: " + ", ".join(f"{k} {v}" for k, v in stage_counts.items()))
        print(f"SUMMARY: {args.cuts} cuts, {len(every)} instances acknowledged, "
              f"{lost_total} lost after a cut, {len(final_missing)} missing at the end, "
              f"{len(whole)}/{len(series)} whole results delivered, {time.time() - t0:.0f} s")
        ok = (lost_total == 0 and not final_missing and len(whole) == len(series)
              and not failed and not left)
        print("PASS" if ok else "FAIL")
        return ok
    finally:
        if daemon and daemon.poll() is None:
            daemon.kill()
        sub.close()
        broker.terminate()
        fs.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--serve-fs", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    ap.add_argument("--work", help="working directory (default: a new temp dir)")
    ap.add_argument("--cuts", type=int, default=10)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--studies", type=int, default=5)
    ap.add_argument("--quiet-period", type=float, default=2.0)
    ap.add_argument("--result-timeout", type=float, default=300)
    ap.add_argument("--no-self-test", action="store_true", help="skip the self-test before the run")
    args = ap.parse_args()
    if args.serve_fs:
        serve_fs(args.serve_fs, args.control)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="power_cut."))
    work.mkdir(parents=True, exist_ok=True)
    if args.self_test:
        sys.exit(0 if self_test(work) else 1)
    if not args.no_self_test and not self_test(work / "self-test"):
        sys.exit("the self-test failed: the model cannot be trusted")
    sys.exit(0 if run(work, args) else 1)


if __name__ == "__main__":
    main()
