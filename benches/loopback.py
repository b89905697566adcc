"""Helpers shared by the benchmark scripts in this folder: loopback ports, a broker, the
daemon's config, its /proc status and its timestamps."""
import socket
import subprocess
import time
from datetime import datetime


def free_port():
    """A loopback port that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=120):
    """Waits until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def start_mosquitto(work):
    """A mosquitto on a free loopback port, configured in `work`: (process, port)."""
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen(["mosquitto", "-c", conf], stderr=subprocess.DEVNULL)
    wait_port(port)
    return broker, port


def write_serve_config(work, root, dicom_port, mqtt_port, quiet_period, threads, series_extra=""):
    """`work`/config.toml for `cspine-triage serve`: spool and outbox in `work`, the
    repository's model, results to the broker on `mqtt_port` under cspine/bench/box/."""
    cfg = work / "config.toml"
    cfg.write_text(f"""
[dicom]
bind = "127.0.0.1"
port = {dicom_port}
spool_dir = "{work}/spool"
[series]
quiet_period_secs = {quiet_period}
{series_extra}[inference]
model = "{root}/models/model.json"
threads = {threads}
[alert]
mqtt_url = "mqtt://127.0.0.1:{mqtt_port}"
site = "bench"
device = "box"
outbox_dir = "{work}/outbox"
""")
    return cfg


def status_kib(pid, key):
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...), 0 when absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def ts(s):
    """Seconds since the epoch of an RFC 3339 timestamp of a result's `timings`."""
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
