"""Role permissions and the session meta API."""

import asyncio

import pytest
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import PublishOptions, SubscribeOptions

from wamp_client import join, next_item, unique, wamp_test

NOT_AUTHORIZED = "wamp.error.not_authorized"


@wamp_test
async def test_service_account_publish_outside_its_permissions(node, service_key):
    s = await join(node.ws, service_key["key"])
    assert s.details.authrole == "service_account"
    # Control: inside com.example.demo.* publishing is allowed.
    pub = await s.publish(unique(), "ok", options=PublishOptions(acknowledge=True))
    assert pub.id > 0
    with pytest.raises(ApplicationError) as ei:
        await s.publish("org.other.topic", "nope", options=PublishOptions(acknowledge=True))
    assert ei.value.error == NOT_AUTHORIZED
    assert ei.value.args and isinstance(ei.value.args[0], str)


@wamp_test
async def test_service_account_not_authorized_outside_its_permissions(node, service_key):
    s = await join(node.ws, service_key["key"])
    with pytest.raises(ApplicationError) as ei:
        await s.subscribe(lambda *a: None, "org.other.topic")
    assert ei.value.error == NOT_AUTHORIZED
    with pytest.raises(ApplicationError) as ei:
        await s.register(lambda: None, "org.other.proc")
    assert ei.value.error == NOT_AUTHORIZED
    with pytest.raises(ApplicationError) as ei:
        await s.call("org.other.proc")
    assert ei.value.error == NOT_AUTHORIZED


@wamp_test
async def test_service_account_cannot_call_session_meta(node, service_key):
    s = await join(node.ws, service_key["key"])
    with pytest.raises(ApplicationError) as ei:
        await s.call("wamp.session.count")
    assert ei.value.error == NOT_AUTHORIZED


@wamp_test
async def test_admin_session_meta_procedures(node):
    s = await join(node.ws, node.key)
    count = await s.call("wamp.session.count")
    assert isinstance(count, int) and not isinstance(count, bool)
    assert count >= 1
    info = await s.call("wamp.session.get", s.details.session)
    assert isinstance(info, dict)
    assert info["session"] == s.details.session
    assert info["authrole"] == "admin"
    assert info["authid"] == node.key_id
    assert info["authmethod"] == "ticket"
    ids = await s.call("wamp.session.list")
    assert s.details.session in ids
    with pytest.raises(ApplicationError) as ei:
        await s.call("wamp.session.get", 1 if s.details.session != 1 else 2)
    assert ei.value.error == "wamp.error.no_such_session"


@wamp_test
async def test_session_meta_on_join_and_on_leave(node, service_key):
    watcher = await join(node.ws, node.key)
    joins: asyncio.Queue = asyncio.Queue()
    leaves: asyncio.Queue = asyncio.Queue()
    await watcher.subscribe(lambda *a, **kw: joins.put_nowait(a), "wamp.session.on_join")
    await watcher.subscribe(lambda *a, **kw: leaves.put_nowait(a), "wamp.session.on_leave")

    other = await join(node.ws, service_key["key"])
    other_id = other.details.session
    # Other tests may run sessions concurrently in the future; skip unrelated joins.
    while True:
        (info,) = await next_item(joins)
        if info["session"] == other_id:
            break
    assert info["authrole"] == "service_account"
    assert info["authid"] == service_key["id"]

    await other.close()
    while True:
        args = await next_item(leaves)
        if args[0] == other_id:
            break


@wamp_test
async def test_session_meta_topics_pattern_subscription(node):
    watcher = await join(node.ws, node.key)
    events: asyncio.Queue = asyncio.Queue()
    await watcher.subscribe(
        lambda *a, details=None: events.put_nowait((a, details)),
        "wamp.session",
        options=SubscribeOptions(match="prefix", details=True),
    )
    other = await join(node.ws, node.key)
    while True:
        (info,), details = await next_item(events)
        if isinstance(info, dict) and info.get("session") == other.details.session:
            break
    assert details.topic == "wamp.session.on_join"


@wamp_test
async def test_session_meta_event_publication_id_is_valid(node):
    watcher = await join(node.ws, node.key)
    events: asyncio.Queue = asyncio.Queue()
    await watcher.subscribe(
        lambda *a, details=None: events.put_nowait((a, details)),
        "wamp.session.on_join",
        options=SubscribeOptions(details=True),
    )
    other = await join(node.ws, node.key)
    while True:
        (info,), details = await next_item(events)
        if info["session"] == other.details.session:
            break
    # Publication ids are global-scope WAMP ids: drawn from [1, 2^53].
    assert 1 <= details.publication <= 2**53, (
        f"meta event EVENT.Publication = {details.publication}"
    )
