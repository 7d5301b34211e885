"""WAMP-Ticket authentication: the API key is the ticket."""

import asyncio
import time

from autobahn.wamp import message

from wamp_client import join, refusal, wamp_test

AUTH_FAILED = "wamp.error.authentication_failed"


@wamp_test
async def test_ticket_auth_accepted(node):
    c = await join(node.ws, node.key, authid="whoever")
    d = c.details
    assert isinstance(d.session, int) and 1 <= d.session <= 2**53
    assert d.realm == node.realm
    assert d.authrole == "admin"
    assert d.authmethod == "ticket"
    # The router identifies the session by the key's id, whatever authid the client asked for.
    assert d.authid == node.key_id
    # Exactly one CHALLENGE, for the ticket method, answered with the key.
    assert [ch.method for ch in c.challenges] == ["ticket"]
    (auth,) = c.sent(message.Authenticate)
    assert auth.signature == node.key
    # WELCOME announces the broker and dealer roles.
    (welcome,) = c.received(message.Welcome)
    assert "broker" in welcome.roles and "dealer" in welcome.roles


@wamp_test
async def test_ticket_refused_bad_key(node):
    # A well-formed key with its signature tampered with...
    k = node.key
    tampered = k[:-6] + ("AAAAAA" if not k.endswith("AAAAAA") else "BBBBBB")
    # ...and plain garbage.
    for ticket in (tampered, "not-a-macula-key"):
        details, abort = await refusal(node.ws, ticket)
        assert details.reason == AUTH_FAILED, (ticket, details.reason, details.message)
        assert abort is not None and abort.reason == AUTH_FAILED
        assert details.message, "ABORT should explain the refusal"


@wamp_test
async def test_ticket_refused_wrong_method_offered(node):
    # Only a method the router does not support: no CHALLENGE, ABORT no_auth_method.
    details, abort = await refusal(node.ws, node.key, authmethods=["wampcra"])
    assert details.reason == "wamp.error.no_auth_method", details
    assert abort is not None and abort.reason == "wamp.error.no_auth_method"


@wamp_test
async def test_ticket_refused_revoked_key(node):
    key = node.create_key(name="to be revoked")
    # The fresh key works...
    c = await join(node.ws, key["key"])
    assert c.details.authrole == "service_account"
    assert c.details.authid == key["id"]
    await c.close()
    # ...until it is revoked. The node re-reads its config about once a second; a client
    # that is not connected has no event to wait for, so retry the join until refused.
    node.revoke_key(key["id"])
    deadline = time.monotonic() + 5.0
    while True:
        try:
            c = await join(node.ws, key["key"])
        except Exception as e:
            details = getattr(e, "details", None)
            assert details is not None, f"join failed without ABORT: {e!r}"
            break
        await c.close()
        assert time.monotonic() < deadline, "revoked key still accepted after 5 s"
        await asyncio.sleep(0.1)
    assert details.reason == AUTH_FAILED, (details.reason, details.message)
    assert "revoked" in (details.message or ""), details.message


@wamp_test
async def test_revoked_key_closes_live_session(node):
    key = node.create_key(name="revoked while connected")
    c = await join(node.ws, key["key"])
    node.revoke_key(key["id"])
    # The node closes sessions using a revoked key on its next reload (~1 s).
    await asyncio.wait_for(asyncio.shield(c.disconnected), 5.0)
    closing = [m for m in c.inbound if isinstance(m, (message.Goodbye, message.Abort))]
    assert closing, "transport closed without GOODBYE/ABORT"
    last = closing[-1]
    assert last.reason == "macula.error.credential_revoked", last
    # An established session is closed with GOODBYE (WAMP spec: ABORT only aborts the
    # opening handshake); only then can the client learn the reason, via onLeave.
    assert isinstance(last, message.Goodbye), (
        f"router closed an established session with {type(last).__name__.upper()} "
        f"{last.reason!r}; Autobahn treats that as a protocol error and never reports the reason"
    )
    assert c.closed.done() and c.closed.result().reason == "macula.error.credential_revoked"


@wamp_test
async def test_goodbye_handshake(node):
    c = await join(node.ws, node.key)
    c.leave("wamp.close.normal")
    details = await asyncio.wait_for(asyncio.shield(c.closed), 5.0)
    # The router answers GOODBYE with GOODBYE wamp.close.goodbye_and_out.
    (goodbye,) = c.received(message.Goodbye)
    assert goodbye.reason == "wamp.close.goodbye_and_out"
    assert details.reason == "wamp.close.goodbye_and_out"
    await asyncio.wait_for(asyncio.shield(c.disconnected), 5.0)
