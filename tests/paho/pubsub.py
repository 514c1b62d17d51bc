"""Paho (Eclipse's Python MQTT client) against edgegw: used by tests/tests/pubsub.rs.

Usage: pubsub.py PORT VERSION   (VERSION is 3.1.1 or 5)

A subscriber at QoS 2 on `paho/#` and a publisher sending QoS 0, 1 and 2 (v5: with user
properties, content type and correlation data). Prints one line per received message,
`TOPIC QOS PAYLOAD [PROPERTIES]`, and exits 0 once all three arrived (1 on timeout).
Works with paho-mqtt 1.6 (Debian) and 2.x.
"""

import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port = int(sys.argv[1])
v5 = sys.argv[2] == "5"
protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311


def client(client_id):
    kwargs = {"client_id": client_id, "protocol": protocol}
    if not v5:
        kwargs["clean_session"] = True
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, **kwargs)
    return mqtt.Client(**kwargs)


received = []
done = threading.Event()
subscribed = threading.Event()


def on_message(_client, _userdata, msg):
    line = f"{msg.topic} {msg.qos} {msg.payload.decode()}"
    if v5:
        props = msg.properties
        line += f" {getattr(props, 'UserProperty', None)} {getattr(props, 'ContentType', None)}"
        line += f" {getattr(props, 'CorrelationData', None)}"
    received.append(line)
    if len(received) == 3:
        done.set()


sub = client(f"paho-sub-{sys.argv[2]}")
sub.on_message = on_message
sub.on_subscribe = lambda *args: subscribed.set()
sub.connect("127.0.0.1", port, keepalive=30)
sub.loop_start()
sub.subscribe("paho/#", qos=2)
if not subscribed.wait(10):
    print("no SUBACK", file=sys.stderr)
    sys.exit(1)

pub = client(f"paho-pub-{sys.argv[2]}")
pub.connect("127.0.0.1", port, keepalive=30)
pub.loop_start()
for qos in (0, 1, 2):
    properties = None
    if v5:
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("k", f"v{qos}")]
        properties.ContentType = "text/plain"
        properties.CorrelationData = b"c"
    info = pub.publish(f"paho/{qos}", f"paho q{qos}", qos=qos, properties=properties)
    info.wait_for_publish(10)

ok = done.wait(10)
for line in received:
    print(line)
pub.disconnect()
sub.disconnect()
pub.loop_stop()
sub.loop_stop()
sys.exit(0 if ok else 1)
