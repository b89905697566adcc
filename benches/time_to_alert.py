#!/usr/bin/env python3
"""Time to alert, as the radiology team sees it: from the last C-STORE response of a
study to the result arriving at a dashboard's MQTT subscriber, broken down by stage.

Also: 4 scanners sending 4 studies at once (throughput, daemon peak RSS).

Usage: python3 benches/time_to_alert.py [--slices-thickness 0.6] [--matrix 512]
       [--coverage-trigger [--min-coverage-mm 150] [--coverage-check-secs 2]
        [--force-early-accept]] [--in-order] [--scanners 0]
--coverage-trigger turns on series.anatomy_coverage_trigger: a result can then come before
the last slice (an early analysis of the slab received), and the whole series follows as
a revised result; both are reported. --force-early-accept sets the daemon's test hook
CSPINE_TEST_EARLY_ACCEPT=1 (every early analysis published, coverage check or not): it
measures the trigger's plumbing with a model that cannot find C1-C7, not a real decision.
--in-order sends the files in Instance Number order (synth numbers them along z), as a
scanner does, instead of storescu's directory scan order.
Needs: a release build (cargo build --release), DCMTK storescu, mosquitto, paho-mqtt.
Prints a Markdown table for BENCHMARKS.md. Not a test: numbers vary with the machine.
"""
import argparse
import json
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from loopback import free_port, start_mosquitto, status_kib, ts, wait_port, write_serve_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CSPINE_BIN", ROOT / "target" / "release" / "cspine-triage"))


def peak_rss_mb(pid):
    kib = status_kib(pid, "VmHWM")
    return kib / 1024 if kib else float("nan")


class Subscriber:
    def __init__(self, port, prefix):
        self.arrivals = {}
        self.results = {}
        self.all = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(prefix + "result", qos=1)
        self.client.loop_start()

    def on_message(self, _c, _u, msg):
        now = time.time()
        r = json.loads(msg.payload)
        with self.lock:
            self.arrivals.setdefault(r["study_instance_uid"], now)
            self.results.setdefault(r["study_instance_uid"], r)
            self.all.setdefault(r["study_instance_uid"], []).append((now, r))

    def wait(self, study_uids, timeout=900, instances=None):
        """Until each study has a result (with `instances` instances, when given)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if all(any(instances is None or r["instances"] == instances for _, r in self.all.get(u, []))
                       for u in study_uids):
                    return
            time.sleep(0.02)
        raise SystemExit(f"results missing after {timeout} s")


IN_ORDER = False


def send(storescu, port, study_dir):
    """storescu with TCP_NODELAY; returns the time its last C-STORE was answered
    (storescu exits right after the release)."""
    env = dict(os.environ, TCP_NODELAY="1")
    if IN_ORDER:
        files = sorted(study_dir.iterdir(), key=lambda p: int(p.stem) if p.stem.isdigit() else 1 << 40)
        what = [str(f) for f in files]
    else:
        what = ["+sd", "+r", str(study_dir)]
    subprocess.run([storescu, "-aec", "CSPINE", "-aet", "BENCH", "127.0.0.1", str(port)] + what,
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slice-thickness", default="0.6")
    ap.add_argument("--matrix", default="512")
    ap.add_argument("--quiet-period", default="2.0")
    ap.add_argument("--scanners", type=int, default=4)
    ap.add_argument("--coverage-trigger", action="store_true")
    ap.add_argument("--min-coverage-mm", default="150.0")
    ap.add_argument("--coverage-check-secs", default="2.0")
    ap.add_argument("--force-early-accept", action="store_true")
    ap.add_argument("--in-order", action="store_true")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (studies, spool, daemon log: about 2 GB with 4 scanners)")
    args = ap.parse_args()
    global IN_ORDER
    IN_ORDER = args.in_order
    trigger = ""
    if args.coverage_trigger:
        trigger = (f"anatomy_coverage_trigger = true\nmin_coverage_mm = {args.min_coverage_mm}\n"
                   f"coverage_check_secs = {args.coverage_check_secs}\n")
    if not BIN.exists():
        raise SystemExit("build first: cargo build --release")
    # DCMTK's storescu (pynetdicom installs another program of that name).
    storescu = "/usr/bin/storescu" if os.path.exists("/usr/bin/storescu") else "storescu"
    work = Path(tempfile.mkdtemp(prefix="cspine-tta-"))

    studies = []
    for i in range(1 + args.scanners):
        out = work / f"study{i}"
        subprocess.run([BIN, "synth", out, "--seed", str(424242 + i), "--fracture", "random", "--matrix", args.matrix,
                        "--slice-thickness", args.slice_thickness], check=True, stdout=subprocess.DEVNULL)
        studies.append(next((out / "train_images").iterdir()))
    n_slices = len(list(studies[0].iterdir()))

    broker, mqtt_port = start_mosquitto(work)
    dicom_port = free_port()
    cfg = write_serve_config(work, ROOT, dicom_port, mqtt_port, args.quiet_period, 2, trigger)
    log = open(work / "serve.log", "w")
    env = dict(os.environ, RUST_LOG="info")
    if args.force_early_accept:
        env["CSPINE_TEST_EARLY_ACCEPT"] = "1"
    daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=log, stdout=log, env=env)
    try:
        wait_port(dicom_port)
        sub = Subscriber(mqtt_port, "cspine/bench/box/")
        time.sleep(0.5)

        # 1. One study, nothing else running.
        t_sent = send(storescu, dicom_port, studies[0])
        uid = studies[0].name
        sub.wait([uid], instances=n_slices)
        with sub.lock:
            got = list(sub.all[uid])
        first_arrival, first = got[0]
        t_arrival, r = next((t, x) for t, x in got if x["instances"] == n_slices)
        t = r["timings"]
        rows = [
            ("last C-STORE answered -> last instance received (spool)", ts(t["last_instance_received"]) - t_sent),
            ("quiet period + assembly (-> series complete)", ts(t["series_complete"]) - ts(t["last_instance_received"])),
            ("volume hand-over (-> inference start)", ts(t["inference_start"]) - ts(t["series_complete"])),
            ("preprocessing + model (inference start -> end)", ts(t["inference_end"]) - ts(t["inference_start"])),
            ("outbox commit (-> published)", ts(t["published"]) - ts(t["inference_end"])),
            ("MQTT to the subscriber", t_arrival - ts(t["published"])),
        ]
        mode = "trigger off"
        if args.coverage_trigger:
            mode = (f"anatomy-coverage trigger on (min_coverage_mm {args.min_coverage_mm}, "
                    f"coverage_check_secs {args.coverage_check_secs}"
                    f"{', CSPINE_TEST_EARLY_ACCEPT=1' if args.force_early_accept else ''})")
        print(f"\n### Time to alert: one study, {n_slices} slices of {args.matrix}x{args.matrix}, "
              f"quiet period {args.quiet_period} s, {mode}, "
              f"{'in Instance Number order' if IN_ORDER else 'storescu +sd order'}, status {r['status']}\n")
        print("| result | instances | last C-STORE response -> arrival (s) |\n| --- | ---: | ---: |")
        print(f"| first result | {first['instances']} | {first_arrival - t_sent:.3f} |")
        print(f"| whole series | {r['instances']} | {t_arrival - t_sent:.3f} |")
        print(f"\nresults received: {len(got)}; breakdown of the whole-series result:\n")
        print("| stage | seconds |\n| --- | ---: |")
        for name, secs in rows:
            print(f"| {name} | {secs:.3f} |")
        print(f"| **last C-STORE response -> alert at subscriber** | **{t_arrival - t_sent:.3f}** |")
        print(f"| of which the quiet period (configured) | {float(args.quiet_period):.3f} |")

        # 2. Several scanners at once.
        if args.scanners == 0:
            return
        uids = [s.name for s in studies[1:]]
        t0 = time.time()
        threads = [threading.Thread(target=send, args=(storescu, dicom_port, s)) for s in studies[1:]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        sub.wait(uids)
        elapsed = max(sub.arrivals[u] for u in uids) - t0
        slices = sum(len(list(s.iterdir())) for s in studies[1:])
        print(f"\n### {args.scanners} scanners at once\n")
        print(f"| studies | slices | first C-STORE -> last alert (s) | studies/min | daemon peak RSS (MB) |")
        print(f"| ---: | ---: | ---: | ---: | ---: |")
        print(f"| {len(uids)} | {slices} | {elapsed:.1f} | {60 * len(uids) / elapsed:.2f} | {peak_rss_mb(daemon.pid):.0f} |")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        broker.terminate()
        if args.keep:
            print(f"\n(work dir {work}; daemon log {work}/serve.log)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
