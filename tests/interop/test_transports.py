"""Pub/sub and RPC over every transport × serializer the router offers.

Each case pairs a session on the transport/serializer under test with a session on
WebSocket + JSON, in both directions, so the router has to re-encode between them.
RawSocket uses Autobahn's asyncio RawSocket client (``rs://host:port`` → TCP).
"""

import asyncio

import pytest
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallResult, PublishOptions, SubscribeOptions

from wamp_client import join, next_item, unique, wamp_test

CASES = [
    ("ws", "json"),
    ("ws", "msgpack"),
    ("ws", "cbor"),
    ("rs", "json"),
    ("rs", "msgpack"),
    ("rs", "cbor"),
]
IDS = [f"{t}-{s}" for t, s in CASES]

# Values every serializer carries losslessly.
ARGS = (0, -1, 2**53, 1.5, "héllo ✓", True, None, [1, [2, [3]]], {"k": {"v": [None, False]}})
KWARGS = {"text": "naïve", "num": 12345678901, "neg": -42, "flt": -0.25, "empty": {}, "list": []}


def _url(node, transport):
    return node.ws if transport == "ws" else node.rawsocket


async def _pair(node, transport, serializer):
    under_test = await join(_url(node, transport), node.key, serializer=serializer)
    reference = await join(node.ws, node.key, serializer="json")
    return under_test, reference


@pytest.mark.parametrize("transport,serializer", CASES, ids=IDS)
@wamp_test
async def test_join(node, transport, serializer):
    s = await join(_url(node, transport), node.key, serializer=serializer)
    assert s.details.authrole == "admin"
    assert s.details.serializer == serializer
    info = await s.call("wamp.session.get", s.details.session)
    assert info["transport"]["serializer"] == serializer, info["transport"]
    expected_type = {"ws": "websocket", "rs": "rawsocket"}[transport]
    assert info["transport"]["type"] == expected_type, info["transport"]


@pytest.mark.parametrize("transport,serializer", CASES, ids=IDS)
@wamp_test
async def test_pubsub_roundtrip(node, transport, serializer):
    a, ref = await _pair(node, transport, serializer)
    topic = unique()
    for receiver, sender in ((a, ref), (ref, a)):
        events: asyncio.Queue = asyncio.Queue()
        await receiver.subscribe(
            lambda *args, details=None, q=events, **kw: q.put_nowait((args, kw, details)),
            topic,
            options=SubscribeOptions(details=True),
        )
        pub = await sender.publish(topic, *ARGS, options=PublishOptions(acknowledge=True), **KWARGS)
        args, kwargs, details = await next_item(events)
        assert args == ARGS
        assert kwargs == KWARGS
        assert details.publication == pub.id
        topic = unique()


@pytest.mark.parametrize("transport,serializer", CASES, ids=IDS)
@wamp_test
async def test_rpc_roundtrip(node, transport, serializer):
    a, ref = await _pair(node, transport, serializer)
    for callee, caller in ((ref, a), (a, ref)):
        proc = unique("com.example.demo.rpc")

        def echo(*args, **kwargs):
            return CallResult(*args, **kwargs)

        def fail():
            raise ApplicationError("com.example.demo.error.oops", "oops", detail=[1, "two"])

        await callee.register(echo, proc)
        await callee.register(fail, f"{proc}.fail")
        res = await caller.call(proc, *ARGS, **KWARGS)
        assert tuple(res.results) == ARGS
        assert res.kwresults == KWARGS
        with pytest.raises(ApplicationError) as ei:
            await caller.call(f"{proc}.fail")
        assert ei.value.error == "com.example.demo.error.oops"
        assert ei.value.args == ("oops",)
        assert ei.value.kwargs == {"detail": [1, "two"]}


@pytest.mark.parametrize("transport,serializer", CASES, ids=IDS)
@wamp_test
async def test_binary_payload_roundtrip(node, transport, serializer):
    # Binary values: native byte strings in MessagePack/CBOR, "\0" + base64 in JSON.
    blob = bytes(range(256)) + b"\x00tail"
    a, ref = await _pair(node, transport, serializer)
    for callee, caller in ((ref, a), (a, ref)):
        proc = unique("com.example.demo.rpc")
        received = []

        def echo(data, *, meta):
            received.append((data, meta))
            return CallResult(data, meta=meta)

        await callee.register(echo, proc)
        res = await caller.call(proc, blob, meta={"b": b"\x01\x02"})
        assert received == [(blob, {"b": b"\x01\x02"})]
        assert tuple(res.results) == (blob,)
        assert res.kwresults == {"meta": {"b": b"\x01\x02"}}
