#!/usr/bin/env python3
"""Peak memory of the daemon under a hostile sender: for DURATION seconds (60 by default) a
pynetdicom SCU sends series after series whose headers claim the largest volume they can
(Rows = Columns = 4096, 0.05 mm pixels, a tilted stack: the model's window then covers
whole slices) while the data on the wire stays tiny (deflated zeros: about 1 KB a slice).
Before the volume limits, 48 such instances drove the volume allocation to 1.26 GB, and
the series was rebuilt after every restart. The daemon's VmHWM must stay below
`series.max_volume_mib` plus 200 MB.

Usage: python3 benches/hostile_rss.py [--duration 60] [--slices 48]
Environment: CSPINE_BIN (default target/release/cspine-triage; a debug build works too).
Needs: mosquitto, pydicom, pynetdicom, numpy, paho-mqtt (tests/requirements.txt).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from loopback import free_port, start_mosquitto, status_kib, wait_port, write_serve_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CSPINE_BIN", ROOT / "target" / "release" / "cspine-triage"))
CT = "1.2.840.10008.5.1.4.1.1.2"
MATRIX = 4096


def hostile_series(n):
    """`n` slices of a 4096 x 4096 matrix, 0.05 mm pixels, tilted 30 degrees (deflated)."""
    study, series = generate_uid(), generate_uid()
    zeros = np.zeros((MATRIX, MATRIX), dtype=np.int16).tobytes()
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.ImageType = "CT", "HOSTILE", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, c, -s]
        # Along the tilted normal (row x column = (0, s, c)): tilted, not sheared.
        ds.ImagePositionPatient = [0, 0.5 * k * s, 0.5 * k * c]
        ds.PixelSpacing = [0.05, 0.05]
        ds.SliceThickness = 0.5
        ds.Rows = ds.Columns = MATRIX
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = zeros
        out.append(ds)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--slices", type=int, default=48)
    args = ap.parse_args()
    if not BIN.exists():
        raise SystemExit(f"{BIN} missing: cargo build --release")
    work = Path(tempfile.mkdtemp(prefix="cspine-hostile-"))
    broker, mqtt_port = start_mosquitto(work)
    dicom_port = free_port()
    cfg = write_serve_config(work, ROOT, dicom_port, mqtt_port, "0.5", 2)
    log = open(work / "serve.log", "w")
    daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=log, stdout=log)
    results = []
    try:
        wait_port(dicom_port)
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hostile-{os.getpid()}")
        sub.on_message = lambda _c, _u, m: results.append(json.loads(m.payload))
        sub.connect("127.0.0.1", mqtt_port)
        sub.subscribe("cspine/bench/box/result", 1)
        sub.loop_start()
        idle = status_kib(daemon.pid, "VmHWM") / 1024
        ae = AE(ae_title="HOSTILE")
        ae.add_requested_context(CT, [DeflatedExplicitVRLittleEndian])
        sent, series_sent, t0 = 0, 0, time.time()
        while time.time() - t0 < args.duration:
            assoc = ae.associate("127.0.0.1", dicom_port, ae_title="CSPINE")
            if not assoc.is_established:
                raise SystemExit("association refused")
            for ds in hostile_series(args.slices):
                assoc.send_c_store(ds)
                sent += 1
            assoc.release()
            series_sent += 1
        time.sleep(5)
        hwm = status_kib(daemon.pid, "VmHWM") / 1024
        statuses = {}
        for r in results:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        reasons = sorted({(r.get("reason") or "")[:90] for r in results})
        cap = 768
        print(f"machine: {os.cpu_count()} cores; binary {BIN}")
        print(f"{series_sent} hostile series ({sent} instances of {MATRIX}x{MATRIX}, 0.05 mm, tilted) "
              f"in {args.duration:.0f} s; results {statuses}")
        for r in reasons:
            print(f"  reason: {r}")
        print(f"VmHWM idle {idle:.1f} MiB, after {hwm:.1f} MiB; bound series.max_volume_mib "
              f"{cap} + 200 = {cap + 200} MiB: {'OK' if hwm < cap + 200 else 'OVER'}")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        broker.terminate()
        broker.wait(timeout=30)
        log.close()
        if os.environ.get("KEEP"):
            print(f"(work dir {work})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
