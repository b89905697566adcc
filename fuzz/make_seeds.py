#!/usr/bin/env python3
"""Builds the seed corpora of the cargo-fuzz targets into fuzz/seeds/<target>/ (not
committed: rebuilt from the same packages .ci/run installs, pydicom, pydicom-data and
pynetdicom). Deterministic for given package versions; prints what it wrote.

- store_data_set: the data sets (file meta stripped) of the real files in pydicom's test
  files and pydicom-data whose transfer syntax the SCP accepts, at most --max-size bytes
  each and --per-syntax files per syntax, each prefixed by the byte that selects its
  transfer syntax in the target (its index in ACCEPTED_TRANSFER_SYNTAXES, src/dicom/syntax.rs).
- command_set: DIMSE command sets encoded by pynetdicom (C-ECHO, C-STORE, C-FIND,
  C-MOVE requests and responses).
- pdu: upper-layer PDUs encoded by pynetdicom: A-ASSOCIATE-RQ/AC/RJ (with extended
  negotiation and user identity items), P-DATA-TF carrying those commands and a data
  set, A-RELEASE-RQ/RP, A-ABORT.
- series_slice: data sets, each prefixed by its transfer syntax's selector byte as for
  store_data_set, at most --slice-per-syntax per syntax the SCP accepts, single-frame
  monochrome CT first, at most --slice-max-size bytes, from the same packages. Most are not
  CT (MR, secondary capture, RT dose) and lack the Image Plane attributes without which
  volume building refuses a slice before decoding it, so the seeds get an
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing where they have none
  (the pixel data is copied as it is, never re-encoded).

Usage: python3 fuzz/make_seeds.py [--max-size 40000] [--per-syntax 6]
                                  [--slice-max-size 48000] [--slice-per-syntax 4]
"""

import argparse
import hashlib
from io import BytesIO
import re
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.filereader import read_preamble, _read_file_meta_info
from pydicom.uid import UID

FUZZ = Path(__file__).resolve().parent
SYNTAX_RS = FUZZ.parent / "src" / "dicom" / "syntax.rs"


def accepted_syntaxes():
    """ACCEPTED_TRANSFER_SYNTAXES in order, read from src/dicom/syntax.rs."""
    src = SYNTAX_RS.read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "([0-9.]+)";', src))
    block = src[src.index("pub const ACCEPTED_TRANSFER_SYNTAXES"):]
    block = block[: block.index("];")]
    out = []
    for first in re.findall(r'\(\s*("[0-9.]+"|\w+)\s*,', block):
        out.append(first.strip('"') if first.startswith('"') else consts[first])
    assert out and out[0] == "1.2.840.10008.1.2.1", out
    return out


def write(target, name, data):
    d = FUZZ / "seeds" / target
    d.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:12]
    (d / f"{name}-{digest}").write_bytes(data)


def data_set_bytes(path):
    """(transfer syntax, data set bytes after the file meta group) of a Part 10 file."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return str(meta.TransferSyntaxUID), fp.read()


def test_file_roots():
    roots = [Path(pydicom.data.__file__).parent]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        print("pydicom-data not installed: seeds from pydicom's own test files only")
    return roots


def store_data_set(max_size, per_syntax):
    syntaxes = accepted_syntaxes()
    roots = test_file_roots()
    taken = {}
    seen = set()
    for root in roots:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                ts, data = data_set_bytes(f)
            except Exception:
                continue  # not a Part 10 file
            if ts not in syntaxes or not data or len(data) > max_size:
                continue
            if taken.get(ts, 0) >= per_syntax or data in seen:
                continue
            seen.add(data)
            taken[ts] = taken.get(ts, 0) + 1
            write("store_data_set", f.stem[:40], bytes([syntaxes.index(ts)]) + data)
    for ts in syntaxes:
        print(f"store_data_set: {taken.get(ts, 0)} seeds in {ts}")


def series_slice(max_size, per_syntax):
    syntaxes = accepted_syntaxes()
    candidates = []
    for root in test_file_roots():
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            if f.stat().st_size > max_size:
                continue
            try:
                ds = pydicom.dcmread(f)
                ts = str(ds.file_meta.TransferSyntaxUID)
            except Exception:
                continue  # not a Part 10 file
            if ts not in syntaxes or "PixelData" not in ds:
                continue
            # Single-frame CT first, then other monochrome images: volume building refuses
            # a multi-frame object before decoding it, and CT is what the daemon sees.
            try:
                frames = int(ds.get("NumberOfFrames", 1) or 1)
            except ValueError:
                frames = 2  # a malformed count: keep such a file last
            mono = str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
            key = (frames > 1, ds.get("Modality") != "CT", not mono, f.stat().st_size, f.name)
            candidates.append((key, ts, f, ds))
    candidates.sort(key=lambda c: c[0])
    taken = {}
    seen = set()
    for _, ts, f, ds in candidates:
        if taken.get(ts, 0) >= per_syntax:
            continue
        if "ImagePositionPatient" not in ds:
            ds.ImagePositionPatient = [-120.0, -120.0, 10.0]
        if "ImageOrientationPatient" not in ds:
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        if "PixelSpacing" not in ds:
            ds.PixelSpacing = [0.5, 0.5]
        out = BytesIO()
        try:
            # pydicom writes the data set back in the file's own transfer syntax (deflate
            # included); encapsulated pixel data is copied as read.
            ds.save_as(out, enforce_file_format=True)
        except Exception as e:
            print(f"series_slice: skipping {f.name}: {e}")
            continue
        out.seek(0)
        read_preamble(out, False)
        _read_file_meta_info(out)
        data = bytes([syntaxes.index(ts)]) + out.read()
        if data in seen:
            continue
        seen.add(data)
        taken[ts] = taken.get(ts, 0) + 1
        write("series_slice", f.stem[:40], data)
    for ts in syntaxes:
        print(f"series_slice: {taken.get(ts, 0)} seeds in {ts}")


def command_sets():
    from pynetdicom import dimse_messages as dm
    from pynetdicom import dimse_primitives as dp
    from pynetdicom.dsutils import encode

    ct = "1.2.840.10008.5.1.4.1.1.2"
    out = []

    echo = dp.C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    out.append(("c-echo-rq", dm.C_ECHO_RQ, echo))
    echo_rsp = dp.C_ECHO()
    echo_rsp.MessageIDBeingRespondedTo = 1
    echo_rsp.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo_rsp.Status = 0
    out.append(("c-echo-rsp", dm.C_ECHO_RSP, echo_rsp))

    store = dp.C_STORE()
    store.MessageID = 7
    store.AffectedSOPClassUID = ct
    store.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    store.Priority = 2
    store.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    store.MoveOriginatorMessageID = 3
    store.DataSet = BytesIO(b"\x00" * 8)
    out.append(("c-store-rq", dm.C_STORE_RQ, store))
    store_rsp = dp.C_STORE()
    store_rsp.MessageIDBeingRespondedTo = 7
    store_rsp.AffectedSOPClassUID = ct
    store_rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    store_rsp.Status = 0xC000
    store_rsp.ErrorComment = "cannot understand"
    store_rsp.OffendingElement = [0x7FE00010]
    out.append(("c-store-rsp", dm.C_STORE_RSP, store_rsp))

    find = dp.C_FIND()
    find.MessageID = 9
    find.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    find.Priority = 0
    find.Identifier = BytesIO(b"\x00" * 8)
    out.append(("c-find-rq", dm.C_FIND_RQ, find))
    move = dp.C_MOVE()
    move.MessageID = 11
    move.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    move.Priority = 1
    move.MoveDestination = "CSPINE"
    move.Identifier = BytesIO(b"\x00" * 8)
    out.append(("c-move-rq", dm.C_MOVE_RQ, move))

    messages = []
    for name, cls, primitive in out:
        msg = cls()
        msg.primitive_to_message(primitive)
        data = encode(msg.command_set, True, True)
        write("command_set", name, data)
        messages.append((name, msg))
    print(f"command_set: {len(out)} seeds")
    return messages


def pdus(messages):
    from pynetdicom import pdu, pdu_primitives as pp
    from pynetdicom.dsutils import encode

    ct = "1.2.840.10008.5.1.4.1.1.2"
    n = 0

    def assoc_primitive():
        p = pp.A_ASSOCIATE()
        p.application_context_name = "1.2.840.10008.3.1.1.1"
        p.calling_ae_title = "STORESCU"
        p.called_ae_title = "CSPINE"
        contexts = []
        for i, (abstract, syntaxes) in enumerate([
            ("1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
            (ct, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70"]),
            ("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1.99"]),
        ]):
            from pynetdicom.presentation import PresentationContext

            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = syntaxes
            contexts.append(cx)
        p.presentation_context_definition_list = contexts
        ml = pp.MaximumLengthNotification()
        ml.maximum_length_received = 16384
        ic = pp.ImplementationClassUIDNotification()
        ic.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.0.2"
        iv = pp.ImplementationVersionNameNotification()
        iv.implementation_version_name = "PYNETDICOM_202"
        aw = pp.AsynchronousOperationsWindowNegotiation()
        aw.maximum_number_operations_invoked = 1
        aw.maximum_number_operations_performed = 1
        rs = pp.SCP_SCU_RoleSelectionNegotiation()
        rs.sop_class_uid = ct
        rs.scu_role = True
        rs.scp_role = False
        ui = pp.UserIdentityNegotiation()
        ui.user_identity_type = 2
        ui.primary_field = b"user"
        ui.secondary_field = b"password"
        ui.positive_response_requested = True
        ext = pp.SOPClassExtendedNegotiation()
        ext.sop_class_uid = ct
        ext.service_class_application_information = b"\x01\x00"
        common = pp.SOPClassCommonExtendedNegotiation()
        common.sop_class_uid = ct
        common.service_class_uid = "1.2.840.10008.4.2"
        common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
        p.user_information = [ml, ic, iv, aw, rs, ui, ext, common]
        return p

    rq = pdu.A_ASSOCIATE_RQ()
    rq.from_primitive(assoc_primitive())
    write("pdu", "a-associate-rq", rq.encode())
    n += 1

    ac_primitive = assoc_primitive()
    ac_primitive.result = 0
    for cx in ac_primitive.presentation_context_definition_list:
        cx.result = 0
        cx.transfer_syntax = cx.transfer_syntax[:1]
    ac_primitive.user_information = [
        u for u in ac_primitive.user_information
        if not isinstance(u, (pp.UserIdentityNegotiation, pp.SOPClassCommonExtendedNegotiation))
    ]
    ac = pdu.A_ASSOCIATE_AC()
    ac.from_primitive(ac_primitive)
    write("pdu", "a-associate-ac", ac.encode())
    n += 1

    rj_primitive = pp.A_ASSOCIATE()
    rj_primitive.result = 1
    rj_primitive.result_source = 1
    rj_primitive.diagnostic = 3
    rj = pdu.A_ASSOCIATE_RJ()
    rj.from_primitive(rj_primitive)
    write("pdu", "a-associate-rj", rj.encode())
    n += 1

    # P-DATA-TF: each command, and a small data set in two fragments.
    for name, msg in messages:
        if name.startswith("c-store-rq"):
            msg.data_set = BytesIO(encode(_tiny_ct(), False, True))
        for i, primitive in enumerate(msg.encode_msg(1, 256)):
            tf = pdu.P_DATA_TF()
            tf.from_primitive(primitive)
            write("pdu", f"p-data-{name}-{i}", tf.encode())
            n += 1

    for name, cls, prim in [
        ("a-release-rq", pdu.A_RELEASE_RQ, pp.A_RELEASE()),
        ("a-release-rp", pdu.A_RELEASE_RP, _release_rp()),
        ("a-abort", pdu.A_ABORT_RQ, _abort()),
    ]:
        p = cls()
        p.from_primitive(prim)
        write("pdu", name, p.encode())
        n += 1
    print(f"pdu: {n} seeds")


def _tiny_ct():
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 4
    return ds


def _release_rp():
    from pynetdicom import pdu_primitives as pp

    p = pp.A_RELEASE()
    p.result = "affirmative"
    return p


def _abort():
    from pynetdicom import pdu_primitives as pp

    p = pp.A_ABORT()
    p.abort_source = 2
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-size", type=int, default=40000)
    ap.add_argument("--per-syntax", type=int, default=6)
    ap.add_argument("--slice-max-size", type=int, default=48000)
    ap.add_argument("--slice-per-syntax", type=int, default=4)
    a = ap.parse_args()
    store_data_set(a.max_size, a.per_syntax)
    series_slice(a.slice_max_size, a.slice_per_syntax)
    pdus(command_sets())


if __name__ == "__main__":
    main()
