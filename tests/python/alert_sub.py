#!/usr/bin/env python3
"""MQTT subscriber for tests/alert.rs: prints one JSON line per event on stdout.

{"event": "subscribed"} once the broker granted the subscription, then
{"event": "message", "topic": ..., "retain": bool, "qos": int, "payload_hex": ...}
per message. With --persistent the session survives disconnects and broker restarts
(clean_session=False), so QoS 1 messages published meanwhile are queued for us.
"""
import argparse
import json
import ssl
import sys

import paho.mqtt.client as mqtt


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", action="append", required=True)
    ap.add_argument("--client-id", default="")
    ap.add_argument("--persistent", action="store_true")
    ap.add_argument("--ca")
    ap.add_argument("--username")
    ap.add_argument("--password")
    args = ap.parse_args()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        clean_session=not args.persistent,
        protocol=mqtt.MQTTv311,
    )
    if args.username:
        client.username_pw_set(args.username, args.password)
    if args.ca:
        client.tls_set(ca_certs=args.ca, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=1, max_delay=1)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            emit({"event": "connect_failed", "reason": str(reason_code)})
            return
        client.subscribe([(t, 1) for t in args.topic])

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        emit({"event": "subscribed"})

    def on_message(client, userdata, msg):
        emit(
            {
                "event": "message",
                "topic": msg.topic,
                "retain": bool(msg.retain),
                "qos": msg.qos,
                "payload_hex": msg.payload.hex(),
            }
        )

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    # The first connection may race the broker's start: retry until it is up.
    while True:
        try:
            client.connect(args.host, args.port, keepalive=10)
            break
        except OSError:
            import time

            time.sleep(0.2)
    client.loop_forever(retry_first_connection=True)


if __name__ == "__main__":
    main()
