"""WAMP over TLS with a standard client: Autobahn|Python joins over ``wss://`` and ``rss://``,
verifying the certificate ``macula up`` made (its CA file) and the host name, and pub/sub and
RPC cross TLS and plain transports. Without the CA, Python's default verification refuses the
self-signed certificate.
"""

import asyncio
import ssl

import pytest

from wamp_client import join, next_item, unique, wamp_test


@pytest.mark.parametrize("transport", ["wss", "rss"])
@wamp_test
async def test_tls_transports_verify_and_carry_traffic(node, transport):
    url = node.wss if transport == "wss" else node.rss
    s = await join(url, node.key, serializer="msgpack", ca=node.ca)
    info = await s.call("wamp.session.get", s.details.session)
    assert info["transport"]["type"] == ("websocket" if transport == "wss" else "rawsocket")

    # An event from a plain local session reaches the TLS subscriber, and a TLS callee answers
    # a plain caller.
    topic, proc = unique(), unique()
    events = asyncio.Queue()
    await s.subscribe(lambda x: events.put_nowait(x), topic)
    await s.register(lambda a, b: a + b, proc)
    plain = await join(node.ws, node.key)
    plain.publish(topic, 42)
    assert await next_item(events) == 42
    assert await plain.call(proc, 2, 3) == 5


@pytest.mark.parametrize("transport", ["wss", "rss"])
@wamp_test
async def test_tls_without_the_ca_is_refused_by_the_client(node, transport):
    url = node.wss if transport == "wss" else node.rss
    with pytest.raises(ssl.SSLCertVerificationError):
        await join(url, node.key)
