#!/usr/bin/env python3
"""Time to alert, as the radiology team sees it: from the last C-STORE response of a
study to the result arriving at a dashboard's MQTT subscriber, broken down by stage.

Also: 4 scanners sending 4 studies at once (throughput, daemon peak RSS).

Usage: python3 benches/time_to_alert.py [--slices-thickness 0.6] [--matrix 512]
Needs: a release build (cargo build --release), DCMTK storescu, mosquitto, paho-mqtt.
Prints a Markdown table for BENCHMARKS.md. Not a test: numbers vary with the machine.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt

from loopback import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("CSPINE_BIN", ROOT / "target" / "release" / "cspine-triage"))


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Subscriber:
    def __init__(self, port, prefix):
        self.arrivals = {}
        self.results = {}
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

    def wait(self, study_uids, timeout=900):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if all(u in self.arrivals for u in study_uids):
                    return
            time.sleep(0.02)
        raise SystemExit(f"results missing after {timeout} s")


def send(storescu, port, study_dir):
    """storescu with TCP_NODELAY; returns the time its last C-STORE was answered
    (storescu exits right after the release)."""
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run([storescu, "-aec", "CSPINE", "-aet", "BENCH", "+sd", "+r", "127.0.0.1", str(port), str(study_dir)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slice-thickness", default="0.6")
    ap.add_argument("--matrix", default="512")
    ap.add_argument("--quiet-period", default="2.0")
    ap.add_argument("--scanners", type=int, default=4)
    args = ap.parse_args()
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

    mqtt_port, dicom_port = free_port(), free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen(["mosquitto", "-c", conf], stderr=subprocess.DEVNULL)
    wait_port(mqtt_port)
    cfg = work / "config.toml"
    cfg.write_text(f"""
[dicom]
bind = "127.0.0.1"
port = {dicom_port}
spool_dir = "{work}/spool"
[series]
quiet_period_secs = {args.quiet_period}
[inference]
model = "{ROOT}/models/model.json"
threads = 2
[alert]
mqtt_url = "mqtt://127.0.0.1:{mqtt_port}"
site = "bench"
device = "box"
outbox_dir = "{work}/outbox"
""")
    log = open(work / "serve.log", "w")
    daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=log, stdout=log,
                              env=dict(os.environ, RUST_LOG="info"))
    try:
        wait_port(dicom_port)
        sub = Subscriber(mqtt_port, "cspine/bench/box/")
        time.sleep(0.5)

        # 1. One study, nothing else running.
        t_sent = send(storescu, dicom_port, studies[0])
        uid = studies[0].name
        sub.wait([uid])
        r, t_arrival = sub.results[uid], sub.arrivals[uid]
        t = r["timings"]
        rows = [
            ("last C-STORE answered -> last instance received (spool)", ts(t["last_instance_received"]) - t_sent),
            ("quiet period + assembly (-> series complete)", ts(t["series_complete"]) - ts(t["last_instance_received"])),
            ("volume hand-over (-> inference start)", ts(t["inference_start"]) - ts(t["series_complete"])),
            ("preprocessing + model (inference start -> end)", ts(t["inference_end"]) - ts(t["inference_start"])),
            ("outbox commit (-> published)", ts(t["published"]) - ts(t["inference_end"])),
            ("MQTT to the subscriber", t_arrival - ts(t["published"])),
        ]
        print(f"\n### Time to alert: one study, {n_slices} slices of {args.matrix}x{args.matrix}, "
              f"quiet period {args.quiet_period} s, status {r['status']}\n")
        print("| stage | seconds |\n| --- | ---: |")
        for name, secs in rows:
            print(f"| {name} | {secs:.3f} |")
        print(f"| **last C-STORE response -> alert at subscriber** | **{t_arrival - t_sent:.3f}** |")
        print(f"| of which the quiet period (configured) | {float(args.quiet_period):.3f} |")

        # 2. Several scanners at once.
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
        print(f"\n(work dir {work}; daemon log {work}/serve.log)", file=sys.stderr)


if __name__ == "__main__":
    main()
