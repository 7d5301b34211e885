"""Remote procedure calls between Autobahn sessions through the router."""

import asyncio
import time

import pytest
from autobahn.wamp import message
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallOptions, CallResult, RegisterOptions

from wamp_client import STEP_TIMEOUT, join, unique, wamp_test

CANCELED = "wamp.error.canceled"


def _call_request_id(session, procedure):
    (call,) = [m for m in session.sent(message.Call) if m.procedure == procedure]
    return call.request


@wamp_test
async def test_rpc_register_and_call_with_args_and_kwargs(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")

    def add(a, b, *, scale=1, label=""):
        return CallResult(a + b, (a + b) * scale, label=label.upper(), inputs=[a, b])

    reg = await callee.register(add, proc)
    assert reg.active and isinstance(reg.id, int)

    res = await caller.call(proc, 2, 3, scale=10, label="sum")
    assert isinstance(res, CallResult)
    assert list(res.results) == [5, 50]
    assert res.kwresults == {"label": "SUM", "inputs": [2, 3]}

    # A single positional result comes back as the plain value.
    await callee.register(lambda x: x * 2, f"{proc}.double")
    assert await caller.call(f"{proc}.double", 21) == 42


@wamp_test
async def test_rpc_caller_disclosure(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    seen = []

    def whoami(details=None):
        seen.append(details)
        return "ok"

    await callee.register(whoami, proc, options=RegisterOptions(details=True))

    # Not disclosed unless asked.
    assert await caller.call(proc) == "ok"
    assert seen[-1].caller is None
    # Autobahn 26's CallOptions has no disclose_me: put CALL.Options.disclose_me on the wire.
    with caller.extra_options(message.Call, disclose_me=True):
        fut = caller.call(proc)
    assert await fut == "ok"
    assert seen[-1].caller == caller.details.session
    assert seen[-1].caller_authrole == "admin"


@wamp_test
async def test_rpc_call_unregistered_procedure(node):
    caller = await join(node.ws, node.key)
    with pytest.raises(ApplicationError) as ei:
        await caller.call(unique("com.example.demo.nobody"), 1)
    assert ei.value.error == "wamp.error.no_such_procedure"
    # ERROR carries a human message as args[0].
    assert ei.value.args and isinstance(ei.value.args[0], str) and ei.value.args[0]


@wamp_test
async def test_rpc_application_error_propagates(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    err_uri = "com.example.demo.error.invalid_input"

    def fails(x):
        raise ApplicationError(err_uri, "bad input", x, field="x", code=7)

    await callee.register(fails, proc)
    with pytest.raises(ApplicationError) as ei:
        await caller.call(proc, -1)
    assert ei.value.error == err_uri
    assert ei.value.args == ("bad input", -1)
    assert ei.value.kwargs == {"field": "x", "code": 7}


@wamp_test
async def test_rpc_shared_registration_roundrobin(node):
    callees = [await join(node.ws, node.key) for _ in range(2)]
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    served = []

    for i, c in enumerate(callees):
        reg = await c.register(
            lambda n, i=i: served.append(i) or i, proc,
            options=RegisterOptions(invoke="roundrobin"),
        )
        assert reg.active

    results = [await caller.call(proc, n) for n in range(6)]
    assert results == served
    assert served.count(0) == 3 and served.count(1) == 3, served
    # Round robin alternates.
    assert all(served[k] != served[k + 1] for k in range(5)), served


@wamp_test
async def test_rpc_progressive_results(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")

    async def countdown(n, details=None):
        assert details.progress is not None, "caller asked for progress but callee can't send it"
        for i in range(n):
            details.progress(i, step=f"s{i}")
        return "done"

    await callee.register(countdown, proc, options=RegisterOptions(details=True))
    progress = []
    res = await caller.call(
        proc, 3,
        options=CallOptions(on_progress=lambda *a, **kw: progress.append((a, kw))),
    )
    assert progress == [((0,), {"step": "s0"}), ((1,), {"step": "s1"}), ((2,), {"step": "s2"})]
    assert res == "done"


@wamp_test
async def test_rpc_cancel(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    started = asyncio.get_running_loop().create_future()

    async def forever():
        started.set_result(True)
        await asyncio.get_running_loop().create_future()

    await callee.register(forever, proc)
    fut = caller.call(proc)
    await asyncio.wait_for(started, STEP_TIMEOUT)
    fut.cancel()  # Autobahn sends CANCEL (no mode: the router's default, skip)
    with pytest.raises(asyncio.CancelledError):
        await fut
    request = _call_request_id(caller, proc)
    # The router answers the CANCEL with ERROR wamp.error.canceled for the call.
    err = await caller.wait_for_message(
        lambda m: isinstance(m, message.Error) and m.request == request
    )
    assert [c.request for c in caller.sent(message.Cancel)] == [request]
    assert err.request_type == message.Call.MESSAGE_TYPE
    assert err.error == CANCELED
    # The call is gone: nothing else arrives for it, and the caller's session still works.
    await callee.register(lambda: "alive", f"{proc}.ping")
    assert await caller.call(f"{proc}.ping") == "alive"
    assert not [m for m in caller.received(message.Result) if m.request == request]


@wamp_test
async def test_rpc_cancel_kill_interrupts_callee(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    interrupted = loop.create_future()

    async def forever():
        started.set_result(True)
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            interrupted.set_result(True)  # Autobahn cancels the handler on INTERRUPT
            raise

    await callee.register(forever, proc)
    fut = caller.call(proc)
    await asyncio.wait_for(started, STEP_TIMEOUT)
    caller.next_options(message.Cancel, mode="kill")
    fut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fut
    request = _call_request_id(caller, proc)
    intr = await callee.wait_for_message(lambda m: isinstance(m, message.Interrupt))
    assert intr.mode == "kill"
    await asyncio.wait_for(interrupted, STEP_TIMEOUT)
    err = await caller.wait_for_message(
        lambda m: isinstance(m, message.Error) and m.request == request
    )
    assert err.error == CANCELED


@wamp_test
async def test_rpc_call_timeout(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")

    async def slow():
        await asyncio.sleep(10)  # stands for work that takes far longer than the timeout
        return "too late"

    await callee.register(slow, proc)
    # CALL.Options.timeout is in milliseconds on the wire; Autobahn 26 passes the value
    # through unchanged and requires an int (a float such as 0.2 fails its own assertion).
    t0 = time.monotonic()
    with pytest.raises(ApplicationError) as ei:
        await caller.call(proc, options=CallOptions(timeout=200))
    elapsed = time.monotonic() - t0
    assert ei.value.error == CANCELED
    assert 0.15 <= elapsed < 3.0, f"timeout fired after {elapsed:.2f} s"
    (call,) = [m for m in caller.sent(message.Call) if m.procedure == proc]
    assert call.timeout == 200
    # The callee announced call_canceling, so the router interrupts the invocation.
    intr = await callee.wait_for_message(lambda m: isinstance(m, message.Interrupt))
    (inv,) = callee.received(message.Invocation)
    assert intr.request == inv.request


@wamp_test
async def test_rpc_unregister(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    reg = await callee.register(lambda: "here", proc)
    assert await caller.call(proc) == "here"
    await reg.unregister()
    assert not reg.active
    with pytest.raises(ApplicationError) as ei:
        await caller.call(proc)
    assert ei.value.error == "wamp.error.no_such_procedure"


@wamp_test
async def test_rpc_register_twice_is_refused(node):
    first = await join(node.ws, node.key)
    second = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    await first.register(lambda: 1, proc)
    with pytest.raises(ApplicationError) as ei:
        await second.register(lambda: 2, proc)
    assert ei.value.error == "wamp.error.procedure_already_exists"


@wamp_test
async def test_rpc_callee_leaving_fails_pending_call(node):
    callee = await join(node.ws, node.key)
    caller = await join(node.ws, node.key)
    proc = unique("com.example.demo.rpc")
    started = asyncio.get_running_loop().create_future()

    async def never():
        started.set_result(True)
        await asyncio.get_running_loop().create_future()

    await callee.register(never, proc)
    fut = caller.call(proc)
    await asyncio.wait_for(started, STEP_TIMEOUT)
    await callee.close()
    with pytest.raises(ApplicationError) as ei:
        await asyncio.wait_for(fut, STEP_TIMEOUT)
    assert ei.value.error == CANCELED
