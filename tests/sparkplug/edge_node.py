"""A Sparkplug B edge node driven by tests/sparkplug.rs, built on pysparkplug (PyPI), an
implementation nobody in this project wrote. It reads one command per line on stdin and answers
"ok <command>" on stdout once the command's messages are published (or "error ..."):

  connect            connect; pysparkplug publishes NBIRTH (bdSeq, metrics with aliases) and the
                     DBIRTH of device "pump"
  data N             N NDATA messages with alias-only metrics, and one DDATA
  skip               take the next seq and publish nothing with it (a message lost upstream)
  wait_rebirth S     wait up to S seconds for an NCMD "Node Control/Rebirth"; answer it with a new
                     NBIRTH and DBIRTH, as an edge node must
  crash              drop the connection without a word: the broker publishes the node's will (an
                     NDEATH with this session's bdSeq); pysparkplug reconnects with the next bdSeq
  quit               disconnect cleanly. pysparkplug 0.6.1 sends this NDEATH with the *next*
                     session's bdSeq (it sets up the next will right after the births), which
                     Sparkplug 3.0 forbids: ferry reports it as a bdSeq mismatch
"""

import itertools
import socket
import sys
import threading
import time

import pysparkplug as psp

GROUP = "plant"
NODE = "edge1"
DEVICE = "pump"


def now():
    return psp.get_current_timestamp()


rebirth_asked = threading.Event()


def on_ncmd(node, message):
    for m in message.payload.metrics:
        if m.name == "Node Control/Rebirth" and m.value:
            rebirth_asked.set()


def node_metrics(value):
    return (
        psp.Metric(timestamp=now(), name="Temperature", alias=1,
                   datatype=psp.DataType.DOUBLE, value=value),
        psp.Metric(timestamp=now(), name="Pressure", alias=2,
                   datatype=psp.DataType.INT32, value=-7),
    )


def device_metrics(value):
    return (psp.Metric(timestamp=now(), name="Speed", alias=10,
                       datatype=psp.DataType.UINT32, value=value),)


def make_node():
    node = psp.EdgeNode(GROUP, NODE, node_metrics(20.0), cmd_callback=on_ncmd)
    node.register(psp.Device(DEVICE, device_metrics(100)))
    return node


def publish(node, kind, payload, device=None):
    topic = psp.Topic(message_type=kind, group_id=GROUP, edge_node_id=NODE, device_id=device)
    node._client.publish(
        psp.Message(topic=topic, payload=payload, qos=psp.QoS.AT_MOST_ONCE, retain=False),
        include_dtypes=True,
    )


def session_bd_seq(node):
    # pysparkplug replaces its bdSeq metric with the next session's right after the births.
    return psp.Metric(timestamp=now(), name="bdSeq", datatype=psp.DataType.INT64,
                      value=(node._bd_seq_metric.value - 1) % 256)


def rebirth(node):
    # What pysparkplug does at connect: seq from 0, NBIRTH with this session's bdSeq, DBIRTHs.
    node._EdgeNode__seq_cycler = itertools.cycle(range(256))
    publish(node, psp.MessageType.NBIRTH,
            psp.NBirth(timestamp=now(), seq=node._seq,
                       metrics=(*node_metrics(20.0), session_bd_seq(node))))
    publish(node, psp.MessageType.DBIRTH,
            psp.DBirth(timestamp=now(), seq=node._seq, metrics=device_metrics(100)),
            device=DEVICE)


def main():
    port = int(sys.argv[1])
    node = make_node()
    value = 20.0
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "connect":
            node.connect("127.0.0.1", port=port, blocking=False)
            # Connected once the births are out: pysparkplug then sets up the next will.
            first = node._bd_seq_metric
            deadline = time.monotonic() + 10
            while node._bd_seq_metric is first and time.monotonic() < deadline:
                time.sleep(0.01)
        elif cmd == "data":
            # By alias only, as the births allow (pysparkplug's update() would send names too):
            # pysparkplug's payload classes and client, this script's choice of metrics.
            for _ in range(int(words[1])):
                value += 0.5
                metric = psp.Metric(timestamp=now(), name=None, alias=1,
                                    datatype=psp.DataType.DOUBLE, value=value)
                publish(node, psp.MessageType.NDATA,
                        psp.NData(timestamp=now(), seq=node._seq, metrics=(metric,)))
            metric = psp.Metric(timestamp=now(), name=None, alias=10,
                                datatype=psp.DataType.UINT32, value=7)
            publish(node, psp.MessageType.DDATA,
                    psp.DData(timestamp=now(), seq=node._seq, metrics=(metric,)), device=DEVICE)
        elif cmd == "skip":
            node._seq
        elif cmd == "wait_rebirth":
            if not rebirth_asked.wait(float(words[1])):
                print("error no rebirth request", flush=True)
                continue
            rebirth_asked.clear()
            rebirth(node)
        elif cmd == "crash":
            # What was published before goes out first (QoS 0 messages still in paho's queue
            # would die with the connection: a loss the test did not ask for).
            deadline = time.monotonic() + 10
            while node._client._client._out_packet and time.monotonic() < deadline:
                time.sleep(0.01)
            # Reconnected once the births are out: pysparkplug then sets up the next will.
            before = node._bd_seq_metric
            node._client._client.socket().shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 20
            while node._bd_seq_metric is before and time.monotonic() < deadline:
                time.sleep(0.01)
            if node._bd_seq_metric is before:
                print("error no reconnect", flush=True)
                continue
        elif cmd == "quit":
            node.disconnect()
            print("ok quit", flush=True)
            return
        print(f"ok {cmd}", flush=True)


main()
