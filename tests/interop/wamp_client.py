"""Autobahn-based WAMP client plumbing for the interop suite.

Every test runs in its own event loop (``asyncio.run``) through the :func:`wamp_test`
decorator, which also closes every session the test opened. Sessions are
:class:`Client` instances: plain Autobahn ``ApplicationSession`` objects that
authenticate with WAMP-Ticket and expose futures for join / close / disconnect plus a
log of every WAMP message received and sent, so tests can assert on what the router
actually put on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ssl
import uuid

import txaio

txaio.use_asyncio()

from autobahn.asyncio.rawsocket import WampRawSocketClientFactory  # noqa: E402
from autobahn.asyncio.wamp import ApplicationSession  # noqa: E402
from autobahn.asyncio.websocket import WampWebSocketClientFactory  # noqa: E402
from autobahn.rawsocket.util import parse_url as parse_rs_url  # noqa: E402
from autobahn.wamp import message  # noqa: E402
from autobahn.wamp.serializer import (  # noqa: E402
    CBORSerializer,
    JsonSerializer,
    MsgPackSerializer,
)
from autobahn.wamp.types import ComponentConfig  # noqa: E402
from autobahn.websocket.util import parse_url as parse_ws_url  # noqa: E402

REALM = "com.example.demo"

# Upper bound for any single awaited step (join, event, result). Generous compared to
# what a local router needs, small enough to keep a hung test from stalling the suite.
STEP_TIMEOUT = 5.0
# Upper bound for a whole test.
TEST_TIMEOUT = 30.0

SERIALIZERS = {
    "json": JsonSerializer,
    "msgpack": MsgPackSerializer,
    "cbor": CBORSerializer,
}

_open_clients: contextvars.ContextVar[list] = contextvars.ContextVar("open_clients")


def unique(prefix: str = "com.example.demo.t") -> str:
    """A fresh URI under ``prefix``: tests share one router, so they never share URIs."""
    return f"{prefix}.u{uuid.uuid4().hex[:12]}"


class SessionRefused(Exception):
    """The router closed the session before WELCOME (ABORT)."""

    def __init__(self, details):
        super().__init__(f"session refused: {details.reason}: {details.message}")
        self.details = details


class ConnectionLost(Exception):
    """The transport closed before the session was established."""


def _with_extra_options(msg, extra: dict):
    """Makes ``msg`` serialize with ``extra`` merged into its Options dict (element 2).

    Autobahn 26 has no API for some options the WAMP spec defines (``CALL.Options.disclose_me``,
    ``CANCEL.Options.mode``); swapping the instance's class for a slot-less subclass with a
    wrapping ``marshal`` adds them without touching Autobahn's request bookkeeping.
    """
    base = type(msg)

    def marshal(self):
        m = base.marshal(self)
        m[2] = {**m[2], **extra}
        return m

    msg.__class__ = type(base.__name__, (base,), {"__slots__": (), "marshal": marshal})
    return msg


class Client(ApplicationSession):
    """A WAMP session that authenticates with WAMP-Ticket and records its traffic."""

    def __init__(self, realm: str, ticket: str, authid: str, authmethods):
        super().__init__(ComponentConfig(realm=realm))
        loop = asyncio.get_running_loop()
        self.ticket = ticket
        self.requested_authid = authid
        self.authmethods = list(authmethods)
        self.joined: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self.disconnected: asyncio.Future = loop.create_future()
        self.challenges = []
        self.inbound = []
        self.outbound = []
        self.details = None
        self.raw_transport = None
        self._waiters = []
        self._pending_options = {}

    # -- transport hooks -------------------------------------------------------------------

    def onOpen(self, transport):
        original_send = transport.send

        def send(msg):
            extra = self._pending_options.pop(type(msg), None)
            if extra:
                _with_extra_options(msg, extra)
            self.outbound.append(msg)
            return original_send(msg)

        transport.send = send
        return super().onOpen(transport)

    def onMessage(self, msg):
        self.inbound.append(msg)
        for waiter in list(self._waiters):
            predicate, fut = waiter
            if not fut.done() and predicate(msg):
                fut.set_result(msg)
                self._waiters.remove(waiter)
        return super().onMessage(msg)

    # -- session hooks ---------------------------------------------------------------------

    def onConnect(self):
        self.join(
            self.config.realm,
            authmethods=self.authmethods,
            authid=self.requested_authid,
        )

    def onChallenge(self, challenge):
        self.challenges.append(challenge)
        if challenge.method != "ticket":
            raise Exception(f"unexpected challenge method {challenge.method!r}")
        return self.ticket

    def onJoin(self, details):
        self.details = details
        if not self.joined.done():
            self.joined.set_result(details)

    def onLeave(self, details):
        if not self.closed.done():
            self.closed.set_result(details)
        if not self.joined.done():
            self.joined.set_exception(SessionRefused(details))
        return super().onLeave(details)

    def onDisconnect(self):
        if not self.joined.done():
            self.joined.set_exception(
                ConnectionLost("transport closed before the session was established")
            )
        if not self.disconnected.done():
            self.disconnected.set_result(True)

    # -- helpers for tests -----------------------------------------------------------------

    @contextlib.contextmanager
    def extra_options(self, msg_type, **options):
        """Adds ``options`` to the next outgoing message of ``msg_type`` sent inside the block."""
        self._pending_options[msg_type] = options
        try:
            yield
        finally:
            self._pending_options.pop(msg_type, None)

    def next_options(self, msg_type, **options):
        """Adds ``options`` to the next outgoing message of ``msg_type``, whenever it is sent
        (for messages Autobahn sends from callbacks, such as CANCEL)."""
        self._pending_options[msg_type] = options

    async def wait_for_message(self, predicate, timeout: float = STEP_TIMEOUT):
        """The first received WAMP message (already received or future) matching ``predicate``."""
        for m in self.inbound:
            if predicate(m):
                return m
        fut = asyncio.get_running_loop().create_future()
        waiter = (predicate, fut)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def sent(self, msg_type):
        return [m for m in self.outbound if isinstance(m, msg_type)]

    def received(self, msg_type):
        return [m for m in self.inbound if isinstance(m, msg_type)]

    async def close(self):
        """Leaves (GOODBYE) if joined and waits for the transport to close."""
        try:
            if self.is_attached():
                self.leave()
            if self.raw_transport is not None and not self.disconnected.done():
                await asyncio.wait_for(asyncio.shield(self.disconnected), 2.0)
        except Exception:
            pass
        finally:
            if self.raw_transport is not None and not self.disconnected.done():
                self.raw_transport.abort()


async def open_client(
    url: str,
    ticket: str,
    *,
    serializer: str = "json",
    realm: str = REALM,
    authid: str = "interop-test",
    authmethods=("ticket",),
    ca: str | None = None,
) -> Client:
    """Opens a transport to ``url`` (``ws://``, ``rs://``, or over TLS ``wss://``, ``rss://``)
    and starts the WAMP handshake. TLS verifies the certificate and host name against ``ca``
    (a PEM file) or, without it, the system's roots."""
    loop = asyncio.get_running_loop()
    client = Client(realm, ticket, authid, authmethods)
    ser = SERIALIZERS[serializer]()
    if url.startswith(("rs://", "rss://")):
        secure, host, port = parse_rs_url(url)
        factory = WampRawSocketClientFactory(lambda: client, serializer=ser)
    else:
        secure, host, port, _, _, _ = parse_ws_url(url)
        factory = WampWebSocketClientFactory(
            lambda: client, url=url, serializers=[ser], loop=loop
        )
    tls = None
    if secure:
        tls = ssl.create_default_context(cafile=ca)
    transport, _ = await asyncio.wait_for(
        loop.create_connection(factory, host, port, ssl=tls), STEP_TIMEOUT
    )
    client.raw_transport = transport
    with contextlib.suppress(LookupError):
        _open_clients.get().append(client)
    return client


async def join(url: str, ticket: str, **kwargs) -> Client:
    """A joined session; raises :class:`SessionRefused` if the router aborts the handshake."""
    client = await open_client(url, ticket, **kwargs)
    await asyncio.wait_for(asyncio.shield(client.joined), STEP_TIMEOUT)
    return client


async def refusal(url: str, ticket: str, **kwargs):
    """Attempts to join and returns ``(CloseDetails, ABORT message)`` of the refusal.

    Fails the test if the router welcomes the session instead.
    """
    client = await open_client(url, ticket, **kwargs)
    try:
        details = await asyncio.wait_for(asyncio.shield(client.joined), STEP_TIMEOUT)
    except SessionRefused as e:
        aborts = client.received(message.Abort)
        return e.details, (aborts[0] if aborts else None)
    raise AssertionError(
        f"router welcomed the session (id {details.session}, authrole {details.authrole}) "
        "instead of refusing it"
    )


def wamp_test(fn=None, *, timeout: float = TEST_TIMEOUT):
    """Runs an ``async def`` test in a fresh event loop, within ``timeout`` seconds, and closes
    its sessions afterwards. ``@wamp_test`` or ``@wamp_test(timeout=...)``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            async def main():
                txaio.config.loop = asyncio.get_running_loop()
                clients = []
                token = _open_clients.set(clients)
                try:
                    return await asyncio.wait_for(fn(*args, **kwargs), timeout)
                finally:
                    _open_clients.reset(token)
                    await asyncio.gather(*(c.close() for c in clients))

            return asyncio.run(main())

        return wrapper

    return decorate(fn) if fn is not None else decorate


async def next_item(queue: asyncio.Queue, timeout: float = STEP_TIMEOUT):
    """The next item of ``queue``; fails with a clear message on timeout."""
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"nothing arrived within {timeout} s") from None
