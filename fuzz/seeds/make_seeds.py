#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (fuzz/seeds/<target>/).

The seeds are checked in; this script documents how they were made and
remakes them: python3 fuzz/seeds/make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


# --- MQTT 3.1.1 packets, byte by byte -------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client_id, user=None, password=None, clean=True, will=None, keep_alive=30):
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if will:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += s(topic) + s(message)
    if user is not None:
        flags |= 0x80
        payload += s(user)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    return packet(0x10, s("MQTT") + bytes([4, flags]) + struct.pack(">H", keep_alive) + payload)


def publish(topic, payload, qos=0, pkid=1, retain=False, dup=False):
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = s(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return packet(first, body)


def subscribe(pkid, *filters):
    return packet(0x82, struct.pack(">H", pkid) + b"".join(s(f) + bytes([q]) for f, q in filters))


def unsubscribe(pkid, *filters):
    return packet(0xA2, struct.pack(">H", pkid) + b"".join(s(f) for f in filters))


def ack(first, pkid):
    return packet(first, struct.pack(">H", pkid))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
DEFAULT_LIMIT, SMALL_LIMIT = b"\x00", b"\xa0"  # see edge_packets.rs

telemetry = b'{"temperature": 21.5, "ts": 1767225600000}'
write("edge_packets", "publish_qos1", DEFAULT_LIMIT + b"\x07"
      + connect("d1", "d1", "secret")
      + publish("devices/d1/telemetry", telemetry, qos=1, pkid=1)
      + ack(0x40, 9) + PINGREQ + DISCONNECT)
write("edge_packets", "subscribe_then_publish", DEFAULT_LIMIT + b"\x2a"
      + connect("app", clean=False)
      + subscribe(2, ("devices/+/telemetry", 1), ("$sluice/presence/#", 0),
                  ("$share/g/devices/#", 2))
      + publish("devices/d1/telemetry", b"1", qos=0)
      + unsubscribe(3, "devices/+/telemetry", "$sluice/presence/#") + DISCONNECT)
write("edge_packets", "will_and_qos2", DEFAULT_LIMIT + b"\x63"
      + connect("d2", "d2", "pw", will=("devices/d2/status", b"offline", 1, True))
      + publish("devices/d2/telemetry", b'{"a":1}', qos=2, pkid=7)
      + ack(0x62, 7) + ack(0x50, 8) + ack(0x70, 8))
write("edge_packets", "oversized_publish", SMALL_LIMIT + b"\x01"
      + connect("d3") + publish("devices/d3/telemetry", b"x" * 200, qos=1))
write("edge_packets", "bad_remaining_length", DEFAULT_LIMIT + b"\x05"
      + connect("d4") + b"\x30\xff\xff\xff\xff\x01")
write("edge_packets", "reserved_flags", DEFAULT_LIMIT + b"\x11"
      + connect("d5") + packet(0x80, struct.pack(">H", 1) + s("a/b") + b"\x01"))

# --- JSON telemetry: topic, newline, payload ------------------------------

for name, topic, payload in [
    ("plain", "devices/d1/telemetry", '{"temperature": 21.5, "humidity": 40}'),
    ("ts_millis", "devices/d1/telemetry", '{"t": -3.5e2, "ts": 1767225600000}'),
    ("ts_rfc3339", "devices/d1/telemetry",
     '{"gps": {"lat": 1.5, "fix": true}, "name": "x", "tags": [1], "n": null,'
     ' "ts": "2026-01-01T00:00:00+01:00"}'),
    ("ts_float", "devices/d1/telemetry", '{"v": 1, "ts": 1.7672256e12}'),
    ("nested", "devices/d-9/telemetry", '{"a": {"b": {"c": {"d": 1e308, "e": -0.0}}}, "a.b": 2}'),
    ("no_values", "devices/d1/telemetry", '{"s": "text", "ts": 1}'),
    ("not_object", "devices/d1/telemetry", "[1, 2, 3]"),
    ("unicode_keys", "devices/\u00e9/telemetry", '{"\u00b0C": 3, "\\u0000": 4}'),
    ("no_device", "devices//telemetry", '{"v": 1}'),
    ("unmatched", "other/d1/telemetry", '{"v": 1}'),
    ("far_future", "devices/d1/telemetry", '{"v": 1, "ts": 9999999999999}'),
]:
    write("json_telemetry", name, topic + "\n" + payload)

# --- Rule manifests --------------------------------------------------------

write("rule_manifest", "full", '''topic = "devices/+/telemetry"
module = "threshold.wasm"
enabled = true
[config]
threshold = 30.0
[limits]
timeout_ms = 100
memory_mb = 16
max_outputs_per_message = 64
table_elements = 10000
state_bytes = 65536
''')
write("rule_manifest", "decoder", 'topic = "sensors/#"\ndecoder = "json-telemetry"\n')
write("rule_manifest", "named_disabled", 'name = "x"\ntopic = "a/b"\nenabled = false\n')
write("rule_manifest", "config_kinds", '''topic = "$SYS/+"
[config]
when = 2026-01-01T00:00:00Z
day = 2026-01-01
list = [1, "two", 3.0, true, [4], {five = 5}]
nan = nan
inf = -inf
[config.nested.deeper]
key = "value"
''')

# --- Page tokens: structured input (arbitrary); any bytes will do --------

write("page_token", "zeros", bytes(64))
write("page_token", "counting", bytes(range(256)))
write("page_token", "token_like", bytes(range(48)) + b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
