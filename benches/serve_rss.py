#!/usr/bin/env python3
"""Peak memory of the whole daemon for ONE large study (the target: <= 400 MB for
700 slices of 512x512): DCMTK storescu -> `cspine-triage serve` -> spool -> volume ->
preprocessing -> tract -> outbox -> mosquitto -> a paho subscriber.

Usage: python3 benches/serve_rss.py [--slices 700] [--size 512] [--threads 2] [--runs 1]
                                   [--series DIR] [--dump FILE]
--series sends an existing folder instead of a new study (its size options are then only
used for the ratio); --dump writes the last result document (JSON) to FILE, so that two
builds can be compared on the same study.
Environment: CSPINE_BIN (default target/release/cspine-triage); MALLOC_ARENA_MAX and the
like are passed on to the daemon, so their effect can be measured from the outside.
Needs: a release build, DCMTK storescu (/usr/bin/storescu: pynetdicom installs another
program of that name), mosquitto, paho-mqtt, pydicom + numpy (benches/series_make_big.py).

The study is benches/series_make_big.py's (uncompressed, explicit VR little endian, files
in random order), so this and benches/series_rss.sh build the same volume. The broker is
an external mosquitto so that the daemon's VmHWM holds the daemon alone (the embedded
broker would add its own buffers). Besides VmHWM (the kernel's peak RSS, read when the
result has arrived), the script samples VmRSS every 20 ms and prints the largest value
seen in each stage, from the result's own timings, to show where the memory goes.
"""
import argparse
import hashlib
import json
import os
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
STORESCU = "/usr/bin/storescu"


class Sampler(threading.Thread):
    """VmRSS of `pid` every 20 ms: (time, KiB)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append((time.time(), status_kib(self.pid, "VmRSS")))
            except OSError:
                return
            time.sleep(0.02)

    def peak(self, t0, t1):
        vals = [kib for t, kib in self.samples if t0 <= t <= t1]
        return max(vals) / 1024 if vals else float("nan")


def one_run(series, threads, quiet):
    work = Path(tempfile.mkdtemp(prefix="cspine-serve-rss-"))
    broker, mqtt_port = start_mosquitto(work)
    dicom_port = free_port()
    cfg = write_serve_config(work, ROOT, dicom_port, mqtt_port, quiet, threads)
    log = open(work / "serve.log", "w")
    daemon = subprocess.Popen([BIN, "serve", "--config", cfg], stderr=log, stdout=log,
                              env=dict(os.environ, RUST_LOG="info"))
    results, key_images, lock = [], {}, threading.Lock()
    try:
        wait_port(dicom_port)
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"serve-rss-{os.getpid()}")

        def on_message(_c, _u, msg):
            with lock:
                if "/keyimage/" in msg.topic:
                    key_images[msg.topic.rsplit("/", 1)[1]] = hashlib.sha256(msg.payload).hexdigest()
                else:
                    results.append((time.time(), json.loads(msg.payload)))

        sub.on_message = on_message
        sub.connect("127.0.0.1", mqtt_port)
        sub.subscribe([("cspine/bench/box/result", 1), ("cspine/bench/box/keyimage/#", 1)])
        sub.loop_start()
        time.sleep(0.5)
        idle_kib = status_kib(daemon.pid, "VmHWM")
        sampler = Sampler(daemon.pid)
        sampler.start()
        t_start = time.time()
        subprocess.run([STORESCU, "-aec", "CSPINE", "-aet", "BENCH", "+sd", "+r", "127.0.0.1", str(dicom_port),
                        str(series)], check=True, env=dict(os.environ, TCP_NODELAY="1"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_sent = time.time()
        deadline = t_sent + 900
        while time.time() < deadline:
            with lock:
                if results:
                    break
            time.sleep(0.05)
        else:
            raise SystemExit("no result within 900 s")
        # The result is published after the outbox commit; give the daemon a moment to
        # release the series (spool bookkeeping) before the final reading.
        time.sleep(1.0)
        sampler.stop.set()
        sampler.join()
        hwm = status_kib(daemon.pid, "VmHWM") / 1024
        t_arrival, r = results[0]
        t = r["timings"]
        stages = [
            ("receiving (first C-STORE -> last response)", t_start, t_sent),
            ("quiet period", t_sent, ts(t["series_complete"])),
            ("volume building", ts(t["series_complete"]), ts(t["inference_start"])),
            ("preprocessing + model + key image", ts(t["inference_start"]), ts(t["inference_end"])),
            ("outbox, publish, release", ts(t["inference_end"]), t_arrival + 1.0),
        ]
        return {
            "status": r["status"],
            "instances": r["instances"],
            "idle_hwm_mib": idle_kib / 1024,
            "hwm_mib": hwm,
            "stages": [(name, sampler.peak(a, b), b - a) for name, a, b in stages],
            "wall_s": t_arrival - t_start,
            "result": dict(r, key_image_sha256=key_images.get(r["id"])),
        }
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=700)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-period", default="2.0")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--series", type=Path)
    ap.add_argument("--dump", type=Path)
    args = ap.parse_args()
    if not BIN.exists():
        raise SystemExit(f"{BIN} missing: cargo build --release")
    if not os.path.exists(STORESCU):
        raise SystemExit("DCMTK storescu not found at /usr/bin/storescu")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}; binary {BIN}; "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="cspine-serve-rss-series-") as d:
        series = args.series or Path(d) / "series"
        if not args.series:
            subprocess.run([sys.executable, ROOT / "benches" / "series_make_big.py", series,
                            str(args.slices), str(args.size)], check=True)
        mb = sum(f.stat().st_size for f in series.iterdir()) / 1e6
        int16_mib = args.slices * args.size * args.size * 2 / 2**20
        print(f"study: {args.slices} slices of {args.size}x{args.size}, {mb:.0f} MB of files, "
              f"int16 volume {int16_mib:.1f} MiB; inference threads {args.threads}")
        for run in range(args.runs):
            r = one_run(series, args.threads, args.quiet_period)
            print(f"\nrun {run + 1}: result {r['status']} ({r['instances']} instances), "
                  f"{r['wall_s']:.1f} s first C-STORE -> result; VmHWM idle {r['idle_hwm_mib']:.1f} MiB, "
                  f"**peak {r['hwm_mib']:.1f} MiB** ({r['hwm_mib'] / int16_mib:.2f}x the int16 volume)")
            print("| stage | largest VmRSS sampled (MiB) | seconds |\n| --- | ---: | ---: |")
            for name, peak, secs in r["stages"]:
                print(f"| {name} | {peak:.1f} | {secs:.2f} |")
            if args.dump:
                args.dump.write_text(json.dumps(r["result"], indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
