#!/usr/bin/env python3
"""Network robustness run: thousands of mutated DICOM datasets and PDUs sent to a live
daemon over loopback; after each batch the daemon must still answer C-ECHO.

Counts crashes (daemon process gone) and hangs (no C-ECHO answer within 10 s), and
tallies what each case got back (C-STORE status, A-ABORT, reject, nothing within the
0.5 s socket timeout) with the slowest C-STORE answer.
Usage: python3 tests/reliability/fuzz_network.py [--count 10000] [--seed 1]
Needs a release build, DCMTK echoscu, pydicom + pydicom-data. Loopback only; bounded in
count and time. Not a test: the cheap parts are tests in tests/dicom_scp.rs.
"""
import argparse
import collections
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.filereader import read_preamble

from loopback import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CSPINE_BIN", ROOT / "target" / "release" / "cspine-triage"))
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def uid(u):
    b = u.encode()
    return b + (b"\0" if len(b) % 2 else b"")


def item(t, payload):
    return struct.pack(">BBH", t, 0, len(payload)) + payload


def associate_rq(called=b"CSPINE", calling=b"FUZZ"):
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, uid(CT)) + item(0x40, uid(EXPLICIT_LE)))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32) + app + pc + user
    return struct.pack(">BBI", 1, 0, len(body)) + body


def element_implicit(group, elem, value):
    return struct.pack("<HHI", group, elem, len(value)) + value


def c_store_rq(sop_uid, msg_id=1):
    els = (element_implicit(0, 2, uid(CT)) + element_implicit(0, 0x100, struct.pack("<H", 1))
           + element_implicit(0, 0x110, struct.pack("<H", msg_id)) + element_implicit(0, 0x700, struct.pack("<H", 0))
           + element_implicit(0, 0x800, struct.pack("<H", 0)) + element_implicit(0, 0x1000, uid(sop_uid)))
    return element_implicit(0, 0, struct.pack("<I", len(els))) + els


def pdata(pc_id, control, data):
    pdv = struct.pack(">IBB", len(data) + 2, pc_id, control) + data
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


def recv_pdu(s):
    head = b""
    while len(head) < 6:
        chunk = s.recv(6 - len(head))
        if not chunk:
            return None, b""
        head += chunk
    t, _, n = struct.unpack(">BBI", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(min(65536, n - len(body)))
        if not chunk:
            break
        body += chunk
    return t, body


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.4 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op < 0.6 and data:
            i = rng.randrange(len(data))
            data[i:i + 4] = struct.pack("<I", rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32)]))
        elif op < 0.8:
            data = data[: rng.randrange(len(data) + 1)]
        else:
            i = rng.randrange(len(data) + 1)
            data[i:i] = os.urandom(rng.randint(1, 64))
    return bytes(data)


def dataset_bytes(path):
    """The dataset (after the File Meta group) of a Part 10 file, explicit VR LE."""
    with open(path, "rb") as f:
        read_preamble(f, False)
        raw = f.read()
    # Skip group 0002 (explicit VR LE elements).
    i = 0
    while i + 8 <= len(raw) and struct.unpack("<H", raw[i:i + 2])[0] == 2:
        vr = raw[i + 4:i + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            n = struct.unpack("<I", raw[i + 8:i + 12])[0]
            i += 12 + n
        else:
            n = struct.unpack("<H", raw[i + 6:i + 8])[0]
            i += 8 + n
    return raw[i:]


PDU_NAMES = {2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA", 6: "A-RELEASE-RP", 7: "A-ABORT"}


def describe_reply(t, body):
    """What a reply PDU says: its type, and for a C-STORE-RSP its Status (0000,0900)."""
    if t is None:
        return "closed, no reply"
    if t == 4:
        i = body.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")  # (0000,0900) US, length 2
        if i >= 0 and i + 10 <= len(body):
            return f"C-STORE status {struct.unpack('<H', body[i + 8:i + 10])[0]:04X}"
    return PDU_NAMES.get(t, f"PDU type 0x{t:02X}")


def one_case(port, rng, seeds, kind):
    """Returns (what came back, seconds the C-STORE answer took or None)."""
    # Short: a mutated length can make either side wait for bytes that never come.
    s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
    outcome, took = f"{'pdu' if kind == 'pdu' else 'data set'}: no reply within 0.5 s", None
    try:
        if kind == "pdu":
            s.sendall(mutate(rng, associate_rq()))
            outcome = "pdu: " + describe_reply(*recv_pdu(s))
            return outcome, None
        s.sendall(associate_rq())
        t, _ = recv_pdu(s)
        if t != 2:
            return "data set: association not accepted", None
        ds = mutate(rng, rng.choice(seeds))
        s.sendall(pdata(1, 0x03, c_store_rq(f"1.2.826.0.1.3680043.10.99.{rng.randrange(10**9)}")))
        for off in range(0, len(ds), 16000):
            last = off + 16000 >= len(ds)
            s.sendall(pdata(1, 0x02 if last else 0x00, ds[off:off + 16000]))
        if not ds:
            s.sendall(pdata(1, 0x02, b""))
        sent = time.monotonic()
        outcome = "data set: " + describe_reply(*recv_pdu(s))
        took = time.monotonic() - sent
        s.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))
        recv_pdu(s)
    except (OSError, socket.timeout):
        pass
    finally:
        s.close()
    return outcome, took


def echo_ok(port):
    r = subprocess.run(["/usr/bin/echoscu" if os.path.exists("/usr/bin/echoscu") else "echoscu", "-aec", "CSPINE", "-to", "10", "127.0.0.1", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    return r.returncode == 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cspine-fuzz-"))
    seeds = [dataset_bytes(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    port, mqtt_port = free_port(), free_port()
    cfg = work / "config.toml"
    cfg.write_text(f"""
[dicom]
bind = "127.0.0.1"
port = {port}
spool_dir = "{work}/spool"
[inference]
model = "{ROOT}/models/model.json"
[alert]
embedded_broker_port = {mqtt_port}
outbox_dir = "{work}/outbox"
""")
    log = open(work / "serve.log", "w")
    daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stdout=log, stderr=log)
    wait_port(port)
    crashes = hangs = 0
    seen = collections.Counter()
    slowest = 0.0
    t0 = time.time()
    batch = 250
    for done in range(0, args.count, batch):
        for _ in range(min(batch, args.count - done)):
            outcome, took = one_case(port, rng, seeds, rng.choice(["pdu", "dataset", "dataset"]))
            seen[outcome] += 1
            slowest = max(slowest, took or 0.0)
        if daemon.poll() is not None:
            crashes += 1
            print(f"daemon exited with {daemon.returncode} after {done + batch} cases", file=sys.stderr)
            break
        if not echo_ok(port):
            hangs += 1
            print(f"no C-ECHO answer after {done + batch} cases", file=sys.stderr)
    daemon.terminate()
    daemon.wait(timeout=30)
    print(f"{sum(seen.values())} mutated PDUs/datasets in {time.time() - t0:.0f} s: "
          f"{crashes} crashes, {hangs} hangs, slowest C-STORE answer {slowest:.2f} s "
          f"(log {work}/serve.log)")
    for outcome, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {outcome}")
    sys.exit(1 if crashes or hangs else 0)


if __name__ == "__main__":
    main()
