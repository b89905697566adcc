#!/usr/bin/env python3
"""Test peer for tests/dicom_scp.rs: drives the cspine-triage SCP with pynetdicom and
raw sockets, and prepares test files from pydicom / pydicom-data plus DCMTK converters.

Every subcommand prints one JSON object on stdout (the Rust test asserts on it).
Needs: pydicom, pydicom-data, pynetdicom, numpy; DCMTK tools for `make-files`.
"""

import argparse
import copy
import json
import os
import socket
import struct
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID
from pynetdicom import AE, debug_logger  # noqa: F401  (debug_logger handy when editing)
from pynetdicom.dimse_primitives import C_STORE

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def out(obj):
    print(json.dumps(obj), flush=True)


def testdata(name):
    """Path of a pydicom test file or a pydicom-data file, by base name."""
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    for root in roots:
        hits = list(root.rglob(name))
        if hits:
            return hits[0]
    sys.exit(f"test file {name} not found: install pydicom and pydicom-data")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed: {r.stderr}")


def make_files(outdir, dcmtk_bin):
    """Writes CT/MR files in every transfer syntax, plus undecodable ones.

    expect: "stored" (decodable: must be stored as sent), "fallback" (SCU converts to a
    syntax we accept), "refused" (no syntax we accept: refused at negotiation)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tool = lambda t: str(Path(dcmtk_bin) / t)  # noqa: E731
    ct = testdata("CT_small.dcm")
    files = []

    def add(path, expect):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(
            {
                "file": str(path),
                "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                "sop_class": str(ds.SOPClassUID),
                "sop_instance": str(ds.SOPInstanceUID),
                "study": str(ds.StudyInstanceUID),
                "series": str(ds.SeriesInstanceUID),
                "expect": expect,
            }
        )

    # One CT instance transcoded by DCMTK into each syntax pydicom-data lacks for CT.
    # Each variant gets its own SOP Instance UID so they do not collide in the spool.
    conversions = [
        ("ct_implicit.dcm", [tool("dcmconv"), "+ti"]),
        ("ct_deflated.dcm", [tool("dcmconv"), "+td"]),
        ("ct_rle.dcm", [tool("dcmcrle")]),
        ("ct_jpeg_baseline.dcm", [tool("dcmcjpeg"), "+eb"]),
        # JPEG Extended (.51) is refused at negotiation (12-bit DCT is not decodable
        # here): checked by the negotiation test, not sent as a file.
        ("ct_jpeg_lossless_p14.dcm", [tool("dcmcjpeg"), "+el"]),
        ("ct_jpeg_lossless_sv1.dcm", [tool("dcmcjpeg"), "+e1"]),
        ("ct_jpegls_lossless.dcm", [tool("dcmcjpls"), "+el"]),
        ("ct_jpegls_near.dcm", [tool("dcmcjpls"), "+en"]),
    ]
    for i, (name, cmd) in enumerate(conversions):
        src = outdir / f"src_{name}"
        ds = pydicom.dcmread(ct)
        if name == "ct_jpegls_near.dcm":
            # Near-lossless JPEG-LS needs unsigned pixels: shift, and keep HU via the intercept.
            import numpy as np

            arr = ds.pixel_array.astype(np.int32)
            offset = -int(arr.min())
            ds.PixelData = (arr + offset).astype(np.uint16).tobytes()
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = float(ds.get("RescaleIntercept", 0)) - offset
        uid = f"{ds.SOPInstanceUID}.{i + 1}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(src, enforce_file_format=True)
        run(cmd + [str(src), str(outdir / name)])
        src.unlink()
        add(outdir / name, "stored")

    # Real files from pydicom / pydicom-data as they are.
    for name in [
        "CT_small.dcm",  # explicit VR LE
        "693_J2KR.dcm",  # JPEG 2000 lossless
        "693_J2KI.dcm",  # JPEG 2000
        "eCT_Supplemental.dcm",  # Enhanced CT
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ]:
        add(testdata(name), "stored")
    # Big endian: refused at negotiation, DCMTK storescu falls back to little endian.
    add(testdata("MR_small_bigendian.dcm"), "fallback")

    # Syntaxes nobody here can decode: the pixel data is a stand-in (the SCP must refuse
    # at negotiation, before any pixel data is sent). DCMTK 3.6.7 can only send MPEG2.
    for name, ts in [("ct_mpeg2.dcm", "1.2.840.10008.1.2.4.100")]:
        ds = pydicom.dcmread(ct)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.100"
        ds.file_meta.TransferSyntaxUID = UID(ts)
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        ds["PixelData"].VR = "OB"
        ds.save_as(outdir / name, enforce_file_format=True)
        add(outdir / name, "refused")
    out({"files": files})


def associate(port, contexts, calling="PYSCU", called="CSPINE"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate("127.0.0.1", int(port), ae_title=called)


def negotiate(port, transfer_syntaxes):
    """Proposes CT Image Storage with each syntax in its own context; reports results."""
    contexts = [(CT, [ts]) for ts in transfer_syntaxes]
    assoc = associate(port, contexts)
    if not assoc.is_established:
        out({"established": False})
        return
    results = []
    for cx in assoc.accepted_contexts + assoc.rejected_contexts:
        results.append(
            {
                "transfer_syntax": str(cx.transfer_syntax[0]),
                "accepted": cx.result == 0,
                "result": cx.result,
            }
        )
    assoc.release()
    out({"established": True, "contexts": results})


def encode(ds):
    """Explicit VR Little Endian encoding of a data set (no file meta)."""
    from pynetdicom.dsutils import encode as pn_encode

    return pn_encode(ds, False, True)


def raw_store(assoc, context_id, sop_class, sop_instance, data, msg_id):
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(req, context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    if rsp is None:
        return None
    return {"status": int(rsp.Status), "comment": str(getattr(rsp, "ErrorComment", "") or "")}


def bad_stores(port):
    """On ONE association: wrong SOP class, truncated data set, UID mismatch, garbage
    bytes, then a good instance and a C-ECHO (the association must still work)."""
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    good = encode(ct)
    assoc = associate(port, [(CT, [EXPLICIT_LE]), (MR, [EXPLICIT_LE]), (VERIFICATION, [IMPLICIT_LE])])
    assert assoc.is_established, "association refused"
    ct_cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CT)
    res = {}
    # The command says MR, the context is CT.
    res["wrong_sop_class"] = raw_store(assoc, ct_cx, MR, ct.SOPInstanceUID + ".9", good, 1)
    # Data set cut in the middle of the pixel data.
    res["truncated"] = raw_store(assoc, ct_cx, CT, ct.SOPInstanceUID, good[: len(good) // 2], 2)
    # Command names another instance than the data set carries.
    res["uid_mismatch"] = raw_store(assoc, ct_cx, CT, "1.2.3.4.5.6", good, 3)
    # Not a data set at all.
    res["garbage"] = raw_store(assoc, ct_cx, CT, ct.SOPInstanceUID, b"\xff\xff\xff\xff" * 64, 4)
    res["good"] = raw_store(assoc, ct_cx, CT, ct.SOPInstanceUID, good, 5)
    echo = assoc.send_c_echo()
    res["echo"] = int(echo.Status) if "Status" in echo else None
    assoc.release()
    out(res)


def lying_length(port):
    """On ONE association: CT_small whose Pixel Data declares 2, 3 and 4 GB (its 32 KiB
    are sent), each timed; then a C-ECHO (the association must still work). The bug
    found by tests/reliability/fuzz_network.py: the SCP allocated and zero-filled the declared
    length before noticing the data was short (about 4 s per 2 GB on an idle machine,
    minutes on a loaded one, and that much memory)."""
    ct = pydicom.dcmread(testdata("CT_small.dcm"))
    assoc = associate(port, [(CT, [EXPLICIT_LE]), (VERIFICATION, [IMPLICIT_LE])])
    assert assoc.is_established, "association refused"
    ct_cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CT)
    stores = []
    base = ct.SOPInstanceUID
    for i, declared in enumerate([0x7FFFFFFE, 0xC0000000, 0xFFFFFFF0]):
        uid = f"{base}.{77 + i}"
        ct.SOPInstanceUID = uid
        data = bytearray(encode(ct))
        at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) OW, 2 reserved, u32 length
        assert at >= 0 and data[at + 4:at + 6] == b"OW", "no Pixel Data OW found"
        data[at + 8:at + 12] = struct.pack("<I", declared)
        started = time.monotonic()
        res = raw_store(assoc, ct_cx, CT, uid, bytes(data), i + 1) or {"status": None}
        res.update(seconds=time.monotonic() - started, declared=declared, sop_instance=uid,
                   pixel_data_offset=at)
        stores.append(res)
    echo = assoc.send_c_echo()
    assoc.release()
    out({"stores": stores, "echo": int(echo.Status) if "Status" in echo else None})


def store(port, path, calling, hold, source=None):
    """Stores one file; prints the status. With --hold, keeps the association open
    (without releasing) until stdin closes, so the test can kill the SCP mid-association.
    With --source, connects from that local address (any 127.x.y.z works on loopback)."""
    ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if source:
        ae = AE(ae_title=calling)
        ae.acse_timeout = 10
        ae.dimse_timeout = 30
        ae.network_timeout = 30
        ae.add_requested_context(ds.SOPClassUID, [ts])
        assoc = ae.associate("127.0.0.1", int(port), ae_title="CSPINE", bind_address=(source, 0))
    else:
        assoc = associate(port, [(ds.SOPClassUID, [ts])], calling=calling)
    if not assoc.is_established:
        out({"established": False})
        return
    status = assoc.send_c_store(ds)
    out({"established": True, "status": int(status.Status) if "Status" in status else None,
         "comment": str(status.get("ErrorComment", "") or "")})
    if hold:
        sys.stdin.read()
        assoc.abort()
    else:
        assoc.release()


def garbage(port, when):
    """Sends an invalid PDU before or after association (or, "idle", associates and then
    stays silent; or, "big-command", associates and sends command set fragments that
    never end, 80,000 bytes of them; or, "non-ascii-echo", associates and sends a C-ECHO-RQ
    whose command set declares UTF-8 and whose Affected SOP Class UID ends in a euro
    sign); reports what came back."""
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
    if when in ("after", "idle", "big-command", "non-ascii-echo"):
        # A minimal valid A-ASSOCIATE-RQ for Verification, then garbage.
        def item(t, payload):
            return struct.pack(">BBH", t, 0, len(payload)) + payload

        app = item(0x10, b"1.2.840.10008.3.1.1.1")
        pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, VERIFICATION.encode()) + item(0x40, IMPLICIT_LE.encode()))
        user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
        body = struct.pack(">HH", 1, 0) + b"CSPINE".ljust(16) + b"PYRAW".ljust(16) + bytes(32) + app + pc + user
        s.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
        hdr = recv_exact(s, 6)
        rest = recv_exact(s, struct.unpack(">I", hdr[2:6])[0])
        assert hdr[0] == 0x02, f"association not accepted: PDU type {hdr[0]:#x} {rest!r}"
    if when == "idle":
        s.settimeout(30)
    elif when == "non-ascii-echo":
        # Implicit VR LE elements; Specific Character Set first, so that it applies to the
        # UID (a command set has no business carrying it, but a peer can send it).
        def el(group, elem, value):
            return struct.pack("<HHI", group, elem, len(value)) + value

        body = (
            el(0x0000, 0x0002, (VERIFICATION + "\u20ac").encode() + b"\0")
            + el(0x0000, 0x0100, struct.pack("<H", 0x0030))
            + el(0x0000, 0x0110, struct.pack("<H", 1))
            + el(0x0000, 0x0800, struct.pack("<H", 0x0101))
        )
        command = el(0x0008, 0x0005, b"ISO_IR 192") + el(0x0000, 0x0000, struct.pack("<I", len(body))) + body
        pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command  # command, last
        s.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    elif when == "big-command":
        # P-DATA-TF, one PDV each: length, context 1, control 0x01 (command, not last).
        fragment = bytes(16000)
        pdv = struct.pack(">IBB", len(fragment) + 2, 1, 0x01) + fragment
        try:
            for _ in range(5):
                s.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
        except OSError:
            pass  # the SCP may abort and close before the last fragment
    else:
        # PDU type 0x99 does not exist; the length is plausible so the peer reads it whole.
        s.sendall(struct.pack(">BBI", 0x99, 0, 16) + b"garbage-garbage!")
    reply = b""
    try:
        reply = recv_exact(s, 10)
    except (ConnectionError, socket.timeout, OSError):
        pass
    s.close()
    out({"reply_type": reply[0] if reply else None, "reply": reply.hex()})


def pdu_item(t, payload):
    return struct.pack(">BBH", t, 0, len(payload)) + payload


def raw_associate(s, calling=b"PYRAW", contexts=((1, VERIFICATION, IMPLICIT_LE),)):
    """Sends a minimal A-ASSOCIATE-RQ on socket `s` (calling AE bytes as given, padded
    to 16) and checks for A-ASSOCIATE-AC."""
    app = pdu_item(0x10, b"1.2.840.10008.3.1.1.1")
    pcs = b"".join(
        pdu_item(0x20, bytes([cid, 0, 0, 0]) + pdu_item(0x30, ab.encode()) + pdu_item(0x40, ts.encode()))
        for cid, ab, ts in contexts
    )
    user = pdu_item(0x50, pdu_item(0x51, struct.pack(">I", 16384)) + pdu_item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + b"CSPINE".ljust(16) + calling.ljust(16) + bytes(32) + app + pcs + user
    s.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
    hdr = recv_exact(s, 6)
    rest = recv_exact(s, struct.unpack(">I", hdr[2:6])[0])
    assert hdr[0] == 0x02, f"association not accepted: PDU type {hdr[0]:#x} {rest!r}"


def implicit_el(group, elem, value):
    return struct.pack("<HHI", group, elem, len(value)) + value


def even(b):
    return b + b"\0" if len(b) % 2 else b


def command_pdu(context_id, elements, last=True):
    """P-DATA-TF with one command PDV: `elements` (implicit VR LE) after a group length."""
    command = implicit_el(0x0000, 0x0000, struct.pack("<I", len(elements))) + elements
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03 if last else 0x01) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def echo_rq(msg_id):
    return command_pdu(1, implicit_el(0x0000, 0x0002, even(VERIFICATION.encode()))
                       + implicit_el(0x0000, 0x0100, struct.pack("<H", 0x0030))
                       + implicit_el(0x0000, 0x0110, struct.pack("<H", msg_id & 0xFFFF))
                       + implicit_el(0x0000, 0x0800, struct.pack("<H", 0x0101)))


def hold_until_stdin_closes():
    sys.stdin.read()


def is_closed(s):
    """True when the peer closed (or reset) the socket; data still unread counts as open."""
    s.setblocking(False)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def no_read(port):
    """Associates, then sends C-ECHO-RQs without ever reading a response, until the SCP
    stops reading too (its responses fill the socket buffers) or closes the connection.
    Prints what happened, then keeps the socket open, unread, until stdin closes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", int(port)))
    raw_associate(s)
    s.setblocking(False)
    batch = b"".join(echo_rq(i) for i in range(1000))
    sent, pending, blocked_since, outcome = 0, batch, None, None
    while outcome is None:
        try:
            n = s.send(pending)
            sent += n
            pending = pending[n:] or batch
            blocked_since = None
            if sent > 512 << 20:
                outcome = "never blocked"
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 3:
                outcome = "stalled"
            time.sleep(0.01)
        except OSError:
            outcome = "closed"
    out({"outcome": outcome, "bytes_sent": sent})
    hold_until_stdin_closes()
    s.close()


def silent(port, source, count):
    """Opens `count` connections from `source` that never send anything; prints how many
    connected, then (once stdin closes) how many the SCP has closed meanwhile."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", int(port)))
        socks.append(s)
    out({"opened": len(socks)})
    hold_until_stdin_closes()
    out({"closed_by_scp": sum(is_closed(s) for s in socks)})


def refusal_flood(port, count, declared):
    """Opens `count` connections that each send an A-ASSOCIATE-RQ header declaring
    `declared` bytes and then all but the last byte of it (so it never completes); prints
    how many were sent, then (once stdin closes) how many the SCP has closed meanwhile."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
        socks.append(s)
    body = bytes(declared - 1)
    refused = 0
    for s in socks:
        try:
            s.sendall(struct.pack(">BBI", 1, 0, declared) + body)
        except OSError:
            refused += 1
    out({"connections": len(socks), "send_failed": refused})
    hold_until_stdin_closes()
    out({"closed_by_scp": sum(is_closed(s) for s in socks)})


def forge_log(port, marker):
    """Log forging: associates with a calling AE that contains a newline followed by
    `marker`, then sends a C-STORE-RQ whose SOP class and instance UIDs do too (the SOP
    class does not match the context, so the SCP drains the data set and answers 0122);
    prints the status, then releases."""
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=30)
    ae = b"A\n" + marker.encode()
    assert len(ae) <= 16, "marker too long for an AE title"
    raw_associate(s, calling=ae, contexts=((1, CT, EXPLICIT_LE),))
    bad_class = f"{MR}\n{marker}_CLASS".encode()
    bad_instance = f"1.2.3\n{marker}_UID".encode()
    s.sendall(command_pdu(1, implicit_el(0x0000, 0x0002, even(bad_class))
                          + implicit_el(0x0000, 0x0100, struct.pack("<H", 0x0001))
                          + implicit_el(0x0000, 0x0110, struct.pack("<H", 1))
                          + implicit_el(0x0000, 0x0700, struct.pack("<H", 0))
                          + implicit_el(0x0000, 0x0800, struct.pack("<H", 0x0000))
                          + implicit_el(0x0000, 0x1000, even(bad_instance))))
    data = bytes(16)
    pdv = struct.pack(">IBB", len(data) + 2, 1, 0x02) + data  # data set, last fragment
    s.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    hdr = recv_exact(s, 6)
    rsp = recv_exact(s, struct.unpack(">I", hdr[2:6])[0])
    assert hdr[0] == 0x04, f"expected P-DATA-TF, got PDU type {hdr[0]:#x}"
    at = rsp.find(struct.pack("<HHI", 0x0000, 0x0900, 2))
    status = struct.unpack("<H", rsp[at + 8:at + 10])[0] if at >= 0 else None
    s.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
    hdr = recv_exact(s, 6)
    recv_exact(s, struct.unpack(">I", hdr[2:6])[0])
    s.close()
    out({"status": status, "release_reply_type": hdr[0]})


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def compare(sent, stored):
    """Semantic comparison of a sent file and the spooled file."""
    a = pydicom.dcmread(sent)
    b = pydicom.dcmread(stored)
    diffs = []
    # Pixel Data is compared below; Data Set Trailing Padding (FFFC,FFFC) is padding,
    # which DCMTK storescu does not transmit.
    skip = (0x7FE00010, 0xFFFCFFFC)
    for elem in a:
        # Group lengths (gggg,0000) are retired; DCMTK recomputes them when sending.
        if elem.tag in skip or elem.tag.element == 0:
            continue
        if elem.tag not in b:
            diffs.append(f"{elem.tag} missing")
        elif b[elem.tag].value != elem.value:
            diffs.append(f"{elem.tag} differs")
    for elem in b:
        if elem.tag not in a and elem.tag not in skip and elem.tag.element != 0:
            diffs.append(f"{elem.tag} added")
    ts_a, ts_b = a.file_meta.TransferSyntaxUID, b.file_meta.TransferSyntaxUID
    if "PixelData" in a:
        if ts_a == ts_b:
            if a.PixelData != b.PixelData:
                diffs.append("PixelData bytes differ")
        elif ts_a.is_compressed or ts_b.is_compressed:
            diffs.append(f"transfer syntax changed from {ts_a} to {ts_b}")
        else:
            import numpy as np

            if not np.array_equal(a.pixel_array, b.pixel_array):
                diffs.append("pixel values differ")
    out({
        "equal": not diffs,
        "diffs": diffs[:20],
        "sent_ts": str(ts_a),
        "stored_ts": str(ts_b),
        "source_ae": str(b.file_meta.get("SourceApplicationEntityTitle", "")).strip(),
    })


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-files")
    m.add_argument("outdir")
    m.add_argument("--dcmtk-bin", required=True)
    n = sub.add_parser("negotiate")
    n.add_argument("port")
    n.add_argument("syntaxes", nargs="+")
    b = sub.add_parser("bad-stores")
    b.add_argument("port")
    ll = sub.add_parser("lying-length")
    ll.add_argument("port")
    s = sub.add_parser("store")
    s.add_argument("port")
    s.add_argument("file")
    s.add_argument("--calling", default="PYSCU")
    s.add_argument("--hold", action="store_true")
    s.add_argument("--source")
    nr = sub.add_parser("no-read")
    nr.add_argument("port")
    si = sub.add_parser("silent")
    si.add_argument("port")
    si.add_argument("--source", default="127.0.0.1")
    si.add_argument("--count", type=int, default=8)
    rf = sub.add_parser("refusal-flood")
    rf.add_argument("port")
    rf.add_argument("--count", type=int, default=48)
    rf.add_argument("--declared", type=int, default=1 << 20)
    fl = sub.add_parser("forge-log")
    fl.add_argument("port")
    fl.add_argument("--marker", default="FORGED")
    g = sub.add_parser("garbage")
    g.add_argument("port")
    g.add_argument("when", choices=["before", "after", "idle", "big-command", "non-ascii-echo"])
    c = sub.add_parser("compare")
    c.add_argument("sent")
    c.add_argument("stored")
    a = p.parse_args()
    if a.cmd == "make-files":
        make_files(a.outdir, a.dcmtk_bin)
    elif a.cmd == "negotiate":
        negotiate(a.port, a.syntaxes)
    elif a.cmd == "bad-stores":
        bad_stores(a.port)
    elif a.cmd == "lying-length":
        lying_length(a.port)
    elif a.cmd == "store":
        store(a.port, a.file, a.calling, a.hold, a.source)
    elif a.cmd == "no-read":
        no_read(a.port)
    elif a.cmd == "silent":
        silent(a.port, a.source, a.count)
    elif a.cmd == "refusal-flood":
        refusal_flood(a.port, a.count, a.declared)
    elif a.cmd == "forge-log":
        forge_log(a.port, a.marker)
    elif a.cmd == "garbage":
        garbage(a.port, a.when)
    elif a.cmd == "compare":
        compare(a.sent, a.stored)


if __name__ == "__main__":
    main()
