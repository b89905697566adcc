"""Loopback helpers shared by the benchmark scripts in this folder."""
import socket
import subprocess
import time


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
