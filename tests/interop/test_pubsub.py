"""Publish & subscribe between Autobahn sessions through the router."""

import asyncio

from autobahn.wamp import message
from autobahn.wamp.request import Publication
from autobahn.wamp.types import PublishOptions, SubscribeOptions

from wamp_client import join, next_item, unique, wamp_test


async def collecting_subscriber(session, topic, match=None):
    """Subscribes ``session`` to ``topic``; events land in the returned queue as
    ``(args, kwargs, details)``."""
    events: asyncio.Queue = asyncio.Queue()

    def on_event(*args, details=None, **kwargs):
        events.put_nowait((args, kwargs, details))

    sub = await session.subscribe(
        on_event, topic, options=SubscribeOptions(match=match, details=True)
    )
    assert sub.active
    return events, sub


@wamp_test
async def test_pubsub_exact_topic(node):
    sub_s = await join(node.ws, node.key)
    pub_s = await join(node.ws, node.key)
    topic = unique()
    events, _ = await collecting_subscriber(sub_s, topic)

    pub_s.publish(topic, 1, "two", [3], color="blue", nested={"a": [1, None]})
    args, kwargs, details = await next_item(events)
    assert args == (1, "two", [3])
    assert kwargs == {"color": "blue", "nested": {"a": [1, None]}}
    assert isinstance(details.publication, int) and details.publication > 0
    # The publisher is not disclosed unless it asks to be.
    assert details.publisher is None


@wamp_test
async def test_pubsub_prefix_match(node):
    sub_s = await join(node.ws, node.key)
    pub_s = await join(node.ws, node.key)
    base = unique()
    events, _ = await collecting_subscriber(sub_s, base, match="prefix")

    # Not under the prefix: must not be delivered.
    pub_s.publish(unique(), "other")
    # Under the prefix (WAMP prefix matching is on the URI string).
    for i, topic in enumerate([base, f"{base}.orders", f"{base}.orders.created", f"{base}x"]):
        pub_s.publish(topic, i)
    for i, topic in enumerate([base, f"{base}.orders", f"{base}.orders.created", f"{base}x"]):
        args, _, details = await next_item(events)
        assert args == (i,), f"expected event {i} for {topic}, got {args}"
        # Pattern subscriptions get the concrete topic in EVENT.Details.topic.
        assert details.topic == topic


@wamp_test
async def test_pubsub_wildcard_match(node):
    sub_s = await join(node.ws, node.key)
    pub_s = await join(node.ws, node.key)
    base = unique()
    pattern = f"{base}..created"  # e.g. com.example.demo.t.uXXXX..created
    events, _ = await collecting_subscriber(sub_s, pattern, match="wildcard")

    # Non-matching: wrong last component, too many components, too few components.
    for topic in (f"{base}.orders.deleted", f"{base}.a.b.created", f"{base}.created"):
        pub_s.publish(topic, "no")
    matching = [f"{base}.orders.created", f"{base}.users.created"]
    for topic in matching:
        pub_s.publish(topic, topic)
    for topic in matching:
        args, _, details = await next_item(events)
        assert args == (topic,), f"non-matching event delivered before {topic}: {args}"
        assert details.topic == topic


@wamp_test
async def test_pubsub_event_details_topic_set_for_pattern_subscriptions(node):
    s = await join(node.ws, node.key)
    pub_s = await join(node.ws, node.key)
    base = unique()
    topic = f"{base}.orders.created"
    exact, exact_sub = await collecting_subscriber(s, topic)
    prefix, prefix_sub = await collecting_subscriber(s, base, match="prefix")
    wild, wild_sub = await collecting_subscriber(s, f"{base}..created", match="wildcard")
    assert len({exact_sub.id, prefix_sub.id, wild_sub.id}) == 3

    pub_s.publish(topic, "x")
    for q in (exact, prefix, wild):
        await next_item(q)
    # Look at the EVENT messages as received (Autobahn itself fills details.topic from the
    # subscription when the router leaves it out).
    events = {m.subscription: m for m in s.received(message.Event)}
    assert events[prefix_sub.id].topic == topic
    assert events[wild_sub.id].topic == topic
    assert events[exact_sub.id].topic in (None, topic)


@wamp_test
async def test_pubsub_publisher_excluded_by_default(node):
    a = await join(node.ws, node.key)
    b = await join(node.ws, node.key)
    topic = unique()
    a_events, _ = await collecting_subscriber(a, topic)
    b_events, _ = await collecting_subscriber(b, topic)

    await a.publish(topic, "first", options=PublishOptions(acknowledge=True))
    args, _, _ = await next_item(b_events)
    assert args == ("first",)
    # A second publication that A does receive: events from one publisher reach a
    # subscriber in order, so if "first" had been delivered to A it would come before this.
    await b.publish(topic, "marker", options=PublishOptions(acknowledge=True))
    args, _, _ = await next_item(a_events)
    assert args == ("marker",), "the publisher received its own event although exclude_me defaults to true"


@wamp_test
async def test_pubsub_exclude_me_false_delivers_to_publisher(node):
    a = await join(node.ws, node.key)
    b = await join(node.ws, node.key)
    topic = unique()
    a_events, _ = await collecting_subscriber(a, topic)
    b_events, _ = await collecting_subscriber(b, topic)

    a.publish(topic, "to all", options=PublishOptions(exclude_me=False))
    assert (await next_item(a_events))[0] == ("to all",)
    assert (await next_item(b_events))[0] == ("to all",)


@wamp_test
async def test_pubsub_acknowledge_returns_publication_id(node):
    a = await join(node.ws, node.key)
    b = await join(node.ws, node.key)
    topic = unique()
    events, _ = await collecting_subscriber(b, topic)

    pub = await a.publish(topic, "acked", options=PublishOptions(acknowledge=True))
    assert isinstance(pub, Publication)
    assert isinstance(pub.id, int) and 1 <= pub.id <= 2**53
    _, _, details = await next_item(events)
    assert details.publication == pub.id
    # Without acknowledge, publish returns nothing to wait for.
    assert a.publish(topic, "fire and forget") is None
    await next_item(events)


@wamp_test
async def test_pubsub_publisher_disclosure(node):
    a = await join(node.ws, node.key)
    b = await join(node.ws, node.key)
    topic = unique()
    events, _ = await collecting_subscriber(b, topic)

    a.publish(topic, "anonymous")
    _, _, details = await next_item(events)
    assert details.publisher is None
    # Autobahn 26's PublishOptions has no disclose_me; add PUBLISH.Options.disclose_me on the wire.
    with a.extra_options(message.Publish, disclose_me=True):
        a.publish(topic, "disclosed")
    _, _, details = await next_item(events)
    assert details.publisher == a.details.session
    assert details.publisher_authrole == "admin"


@wamp_test
async def test_pubsub_unsubscribe_stops_delivery(node):
    s = await join(node.ws, node.key)
    pub_s = await join(node.ws, node.key)
    topic = unique()
    gone, gone_sub = await collecting_subscriber(s, topic)
    # A second subscription of the same session on a different topic, as an ordering marker.
    marker_topic = unique()
    marker, _ = await collecting_subscriber(s, marker_topic)

    pub_s.publish(topic, "before")
    assert (await next_item(gone))[0] == ("before",)
    await gone_sub.unsubscribe()
    assert not gone_sub.active
    pub_s.publish(topic, "after")
    pub_s.publish(marker_topic, "marker")
    assert (await next_item(marker))[0] == ("marker",)
    assert gone.empty(), "event delivered after UNSUBSCRIBED"
    assert not [m for m in s.received(message.Event) if list(m.args or []) == ["after"]]


@wamp_test
async def test_pubsub_eligible_and_exclude_lists(node):
    pub_s = await join(node.ws, node.key)
    b = await join(node.ws, node.key)
    c = await join(node.ws, node.key)
    topic = unique()
    b_events, _ = await collecting_subscriber(b, topic)
    c_events, _ = await collecting_subscriber(c, topic)

    pub_s.publish(topic, "only b", options=PublishOptions(eligible=[b.details.session]))
    pub_s.publish(topic, "not b", options=PublishOptions(exclude=[b.details.session]))
    pub_s.publish(topic, "everyone")
    assert (await next_item(b_events))[0] == ("only b",)
    assert (await next_item(b_events))[0] == ("everyone",)
    assert (await next_item(c_events))[0] == ("not b",)
    assert (await next_item(c_events))[0] == ("everyone",)
