#!/usr/bin/env python3
"""A CT scanner as tests/scanner.rs needs one: sends instances with pynetdicom the way
real scanners do (several associations, scouts first, corrected re-sends, an association
aborted mid-series) and prepares the files those behaviours send.

Every subcommand prints one JSON object on stdout; the Rust tests assert on it.

  send PORT FILE...                  -> {"statuses": [int, ...], "error": str|null}
      [--aet AE] [--abort-after N]     one DIMSE status a file
      [--dimse-timeout S] (--abort-after: A-ABORT after
                                       N files, the rest get -1; -2: no status in the
                                       response; -3: the association had ended)
  scout SRC OUT                      -> {"series": uid}  a localizer of SRC's study
  reseries SRCDIR OUTDIR --kernel K  -> {"series": uid}  the same images as a second series
      [--thickness MM]                 of the study (new series and SOP UIDs), another kernel
  correct SRC OUT                    -> {"sop": uid}     the same SOP Instance UID, content
                                                         corrected (window, comments)
"""

import argparse
import json
import os
import sys

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

CT = "1.2.840.10008.5.1.4.1.1.2"


def out(obj):
    print(json.dumps(obj), flush=True)


def send(args):
    ae = AE(ae_title=args.aet)
    # Generous: the tests run beside other daemons on a 2-core machine.
    ae.acse_timeout = 60
    ae.dimse_timeout = args.dimse_timeout
    ae.network_timeout = args.dimse_timeout
    datasets = [pydicom.dcmread(f) for f in args.files]
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID),
                                             "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", args.port, ae_title="CSPINE")
    if not assoc.is_established:
        out({"statuses": [], "error": "association not established"})
        return
    statuses, error = [], None
    for i, ds in enumerate(datasets):
        if args.abort_after is not None and i >= args.abort_after:
            statuses.append(-1)
            continue
        if not assoc.is_established:
            # The association ended under us (aborted by the peer, or a timeout).
            error = error or f"association not established any more before file {i}"
            statuses.append(-3)
            continue
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status and "Status" in status else -2)
    if args.abort_after is not None:
        assoc.abort()
    elif assoc.is_established:
        assoc.release()
    out({"statuses": statuses, "error": error})


def scout(args):
    ds = pydicom.dcmread(args.src)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Topogram"
    ds.InstanceNumber = 1
    # A lateral topogram: sagittal orientation.
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(args.out, enforce_file_format=True)
    out({"series": str(ds.SeriesInstanceUID)})


def reseries(args):
    series = generate_uid()
    os.makedirs(args.outdir, exist_ok=True)
    for name in sorted(os.listdir(args.srcdir)):
        ds = pydicom.dcmread(os.path.join(args.srcdir, name))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ConvolutionKernel = args.kernel
        ds.SeriesNumber = int(ds.get("SeriesNumber", 2) or 2) + 1
        if args.thickness:
            ds.SliceThickness = args.thickness
        ds.save_as(os.path.join(args.outdir, name), enforce_file_format=True)
    out({"series": str(series)})


def correct(args):
    ds = pydicom.dcmread(args.src)
    ds.ImageComments = "corrected re-send"
    ds.WindowCenter = 400
    ds.WindowWidth = 1800
    ds.save_as(args.out, enforce_file_format=True)
    out({"sop": str(ds.SOPInstanceUID)})


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("port", type=int)
    s.add_argument("files", nargs="+")
    s.add_argument("--aet", default="CTSCANNER")
    s.add_argument("--abort-after", type=int)
    # A peer killed mid-association is noticed only through this timeout.
    s.add_argument("--dimse-timeout", type=float, default=300)
    s.set_defaults(func=send)
    s = sub.add_parser("scout")
    s.add_argument("src")
    s.add_argument("out")
    s.set_defaults(func=scout)
    s = sub.add_parser("reseries")
    s.add_argument("srcdir")
    s.add_argument("outdir")
    s.add_argument("--kernel", required=True)
    s.add_argument("--thickness", type=float)
    s.set_defaults(func=reseries)
    s = sub.add_parser("correct")
    s.add_argument("src")
    s.add_argument("out")
    s.set_defaults(func=correct)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
