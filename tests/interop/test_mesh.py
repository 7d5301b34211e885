"""Autobahn|Python clients on different nodes of a three-node mesh (`macula up --nodes 3`):
a subscriber on node 1 receives what a publisher on node 3 sends; a caller on node 2 reaches a
callee on node 3."""

import asyncio
import json
import os
import subprocess

import pytest
from autobahn.wamp.exception import ApplicationError

from conftest import REALM, STARTUP_TIMEOUT, _read_first_line, macula_bin
from wamp_client import join, next_item, unique, wamp_test


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh")
    log_path = base / "mesh.log"
    env = {k: v for k, v in os.environ.items() if k != "MACULA_HOME"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(macula_bin()), "--json", "up", "--nodes", "3",
                "--home", str(base / "home"),
                "--http", "127.0.0.1:0", "--rawsocket", "127.0.0.1:0",
                "--mesh-port", "17750", "--realm", REALM,
            ],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env,
        )
    try:
        line = _read_first_line(proc, STARTUP_TIMEOUT)
        assert line, f"macula up --nodes 3 did not start:\n{log_path.read_text(errors='replace')}"
        info = json.loads(line)
        assert len(info["nodes"]) == 3, info
        yield info
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


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
