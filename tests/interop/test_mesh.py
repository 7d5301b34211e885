"""Autobahn|Python clients on different nodes of a three-node mesh (`macula up --nodes 3`):
a subscriber on node 1 receives what a publisher on node 3 sends; a caller on node 2 reaches a
callee on node 3."""

import asyncio
import contextlib
import json
import os
import subprocess

import pytest
from autobahn.wamp.exception import ApplicationError

from conftest import REALM, STARTUP_TIMEOUT, _read_first_line, macula_bin
from wamp_client import join, next_item, unique, wamp_test

RUNS = int(os.environ.get("MESH_RUNS", "50"))
FRESH_RUNS = int(os.environ.get("MESH_FRESH_RUNS", "50"))


@contextlib.contextmanager
def running_mesh(base, mesh_port: int):
    """`macula up --nodes 3` in `base`, yielding what it printed; stopped afterwards."""
    log_path = base / "mesh.log"
    env = {k: v for k, v in os.environ.items() if k != "MACULA_HOME"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(macula_bin()), "--json", "up", "--nodes", "3",
                "--home", str(base / "home"),
                "--http", "127.0.0.1:0", "--rawsocket", "127.0.0.1:0",
                "--mesh-port", str(mesh_port), "--realm", REALM,
            ],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env,
        )
    try:
        # Three debug-build nodes on a busy two-core machine: more time than for one node.
        line = _read_first_line(proc, 3 * STARTUP_TIMEOUT)
        assert line, (
            f"macula up --nodes 3 printed no startup line within {3 * STARTUP_TIMEOUT} s "
            f"(exit code {proc.poll()}); its log:\n{log_path.read_text(errors='replace')}"
            + "".join(
                f"\n--- {p}:\n{p.read_text(errors='replace')[-4000:]}"
                for p in sorted((base / "home" / "nodes").glob("*/node.log"))
            )
        )
        info = json.loads(line)
        assert len(info["nodes"]) == 3, info
        yield info
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with running_mesh(tmp_path_factory.mktemp("mesh"), 17750) as info:
        yield info


@wamp_test
async def test_subscriber_on_node1_receives_a_publication_from_node3(mesh):
    n1, _, n3 = mesh["nodes"]
    sub_s = await join(n1["ws"], mesh["key"])
    pub_s = await join(n3["ws"], mesh["key"])
    topic = unique()
    events: asyncio.Queue = asyncio.Queue()
    await sub_s.subscribe(lambda *a, **kw: events.put_nowait(a), topic)
    # Interest reaches node 3 within moments; publish until it has (then exactly once each).
    for i in range(100):
        pub_s.publish(topic, "probe", i)
        try:
            await asyncio.wait_for(events.get(), 0.1)
            break
        except asyncio.TimeoutError:
            continue
    else:
        pytest.fail("no event crossed from node 3 to node 1 within 10 s")
    await asyncio.sleep(0.3)
    while not events.empty():
        events.get_nowait()
    for i in range(20):
        pub_s.publish(topic, "n", i)
    for i in range(20):
        assert await next_item(events) == ("n", i)
    await asyncio.sleep(0.2)
    assert events.empty(), "no duplicates"


@wamp_test
async def test_caller_on_node2_reaches_a_callee_on_node3(mesh):
    _, n2, n3 = mesh["nodes"]
    callee = await join(n3["ws"], mesh["key"])
    caller = await join(n2["ws"], mesh["key"])
    proc = unique("com.example.demo.add")
    await callee.register(lambda a, b: a + b, proc)
    for _ in range(100):
        try:
            assert await caller.call(proc, 2, 3) == 5
            break
        except ApplicationError as e:
            assert e.error == "wamp.error.no_such_procedure", e
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the registration on node 3 never reached node 2")
    assert await caller.call(proc, 40, 2) == 42


@wamp_test
async def test_what_a_client_is_told_holds_across_the_mesh(mesh):
    """SUBSCRIBED and REGISTERED are sent once the other nodes have the subscription or
    registration: an event published on node 2 right after a subscriber on node 1 got SUBSCRIBED
    is delivered, and a roundrobin callee on node 3 that got REGISTERED is among the very first
    calls from node 2. Fifty runs in a row, no miss."""
    n1, n2, n3 = mesh["nodes"]
    key = mesh["key"]
    sub_s = await join(n1["ws"], key)
    pub_s = await join(n2["ws"], key)
    callee2 = await join(n2["ws"], key)
    callee3 = await join(n3["ws"], key)
    for run in range(RUNS):
        r2, r3, proc = await _told_holds(sub_s, pub_s, callee2, callee3, pub_s, run)
        # UNREGISTERED too: once node 3 confirms, calls from node 2 no longer go there.
        await r3.unregister()
        answers = {await pub_s.call(proc) for _ in range(2)}
        assert answers == {"a"}, (run, answers)
        await r2.unregister()


async def _told_holds(sub_s, pub_s, callee_a, callee_b, caller, run):
    """One round of the checks: an event published right after SUBSCRIBED arrives, and
    both roundrobin callees that got REGISTERED are among the first calls."""
    from autobahn.wamp.types import PublishOptions, RegisterOptions

    topic = unique()
    events: asyncio.Queue = asyncio.Queue()
    sub = await sub_s.subscribe(lambda *a, **kw: events.put_nowait(a), topic)
    await pub_s.publish(topic, run, options=PublishOptions(acknowledge=True))
    got = await asyncio.wait_for(events.get(), 5.0)
    assert got == (run,), (run, got)
    await sub.unsubscribe()
    proc = unique("com.example.demo.rr")
    rr = RegisterOptions(invoke="roundrobin")
    r_a = await callee_a.register(lambda: "a", proc, options=rr)
    r_b = await callee_b.register(lambda: "b", proc, options=rr)
    answers = {await caller.call(proc) for _ in range(4)}
    assert answers == {"a", "b"}, (run, answers)
    return r_a, r_b, proc


# Fifty meshes of three debug-build nodes, started one after another: far more than one
# test's usual 30 s on a busy two-core machine.
@wamp_test(timeout=600.0)
async def test_what_a_client_is_told_holds_on_a_fresh_mesh(tmp_path_factory):
    """The same promise on a mesh that has just started, where the nodes serving the realm have
    not linked yet when the clients arrive: a fresh `macula up --nodes 3` for every run, the
    subscriber and a callee on node 2, the publisher, the caller and the other callee on node 3
    (nodes 2 and 3 only know node 1 at start). No miss in any run."""
    for run in range(FRESH_RUNS):
        base = tmp_path_factory.mktemp(f"fresh{run}")
        with running_mesh(base, 17800 + 3 * (run % 50)) as info:
            _, n2, n3 = info["nodes"]
            key = info["key"]
            sub_s, callee2 = await join(n2["ws"], key), await join(n2["ws"], key)
            pub_s, callee3 = await join(n3["ws"], key), await join(n3["ws"], key)
            await _told_holds(sub_s, pub_s, callee2, callee3, pub_s, run)
            for s in (sub_s, callee2, pub_s, callee3):
                await s.close()
