"""Worker threads per model (rayline.serving.work), with real threads: one model's
full pool refuses at once and stalls no other model; a call whose caller has gone never
runs; a call running past its caller keeps its place; a small DQN request is not batched
with a big one waiting on the heavy lane."""

import asyncio
import os
import sys
import threading
import time

import pytest

from rayline.serving.work import Busy, WorkPools


async def until(condition, timeout_s: float = 10.0) -> None:
    """Polls `condition` (what a worker thread's done-callback changes) until it holds or
    `timeout_s` passes; the assertion after it says which."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_a_full_model_refuses_at_once_and_the_others_answer():
    async def scenario():
        pools = WorkPools(threads=2, queued=3)
        release = threading.Event()
        slow = [asyncio.ensure_future(pools.run("slow", release.wait)) for _ in range(5)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="'slow' has 5 calls in hand"):
            await pools.run("slow", release.wait)
        assert pools.saturated(["slow"]) and not pools.saturated(["slow", "fast"])
        assert await asyncio.wait_for(pools.run("fast", sum, [1, 2, 3]), 1.0) == 6
        release.set()
        assert await asyncio.gather(*slow) == [True] * 5
        assert pools.pending == {"slow": 0, "fast": 0}
        assert await pools.run("slow", sum, [1]) == 1

    asyncio.run(scenario())


def test_a_call_whose_caller_has_gone_is_never_computed():
    async def scenario():
        pools = WorkPools(threads=1, queued=4)
        release, ran = threading.Event(), []
        running = asyncio.ensure_future(pools.run("m", release.wait))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):  # queued behind the running one
            await asyncio.wait_for(pools.run("m", ran.append, "gone"), 0.05)
        assert pools.pending["m"] == 1  # the cancelled call gave its place back
        release.set()
        await running
        assert await pools.run("m", ran.append, "here") is None
        assert ran == ["here"]

    asyncio.run(scenario())


def test_a_call_running_past_its_caller_keeps_its_place_until_done():
    async def scenario():
        pools = WorkPools(threads=1, queued=0)
        release = threading.Event()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pools.run("m", release.wait), 0.05)
        assert pools.busy("m") and pools.saturated(["m"])  # the thread still holds it
        with pytest.raises(Busy):
            await pools.run("m", sum, [1])
        release.set()
        # Given back when the thread is done: on 2 loaded cores that took over 50 ms once.
        await until(lambda: not pools.busy("m"))
        assert not pools.busy("m") and await pools.run("m", sum, [2]) == 2

    asyncio.run(scenario())


def test_a_heavy_call_runs_on_its_own_lane_in_the_idle_scheduling_class():
    def my_policy() -> int:
        return os.sched_getscheduler(threading.get_native_id())

    switch_interval_s = sys.getswitchinterval()

    async def scenario():
        pools = WorkPools(threads=2, queued=1)
        release = threading.Event()
        heavy = [asyncio.ensure_future(pools.run("m", release.wait, heavy=True)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match=r"'m \(heavy\)' has 2 calls in hand"):
            await pools.run("m", sum, [1], heavy=True)
        assert sys.getswitchinterval() == 0.0005  # while a heavy call runs
        # The light lane is free, in the replica's own scheduling class.
        assert await pools.run("m", my_policy) == os.sched_getscheduler(0)
        release.set()
        await asyncio.gather(*heavy)
        assert await pools.run("m", my_policy, heavy=True) == os.SCHED_IDLE
        await until(lambda: sys.getswitchinterval() == switch_interval_s)  # the done-callback
        assert sys.getswitchinterval() == switch_interval_s

    asyncio.run(scenario())


class RouteModels:
    """The `Models` a route sees (rayline.serving.http.Models), for one policy held here:
    real worker threads and a real batcher, no timeout."""

    batching = True

    def __init__(self, policy):
        from rayline.serving.batching import Batcher

        self.policy, self.pools, self.batchers = policy, WorkPools(), {}
        self.make_batcher = Batcher

    def local(self, name, kind, key=None, version=None):
        return self.policy

    async def run(self, key, function, *args, heavy=False):
        return await self.pools.run(key, function, *args, heavy=heavy)

    async def answer(self, awaitable):
        return await awaitable

    def shadow(self, name, method, args, answer):
        pass

    def batcher(self, key, compute, max_batch):
        if key not in self.batchers:
            self.batchers[key] = self.make_batcher(compute, max_batch)
        return self.batchers[key]


def test_a_small_dqn_request_does_not_wait_for_a_big_one_on_the_heavy_lane(tmp_path):
    import io
    import json

    import torch

    from rayline.rl.networks import NetworkSpec, build_q_network
    from rayline.rl.predictor import DQNPolicy
    from rayline.rl.routes import HEAVY_OBSERVATIONS, MAX_OBSERVATIONS, answer_act
    from rayline.store import ModelRegistry

    registry = ModelRegistry(str(tmp_path))
    spec = NetworkSpec([4], 2, [64, 64], dueling=False)
    torch.manual_seed(0)
    network = build_q_network(spec).eval()
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    files = {"policy.pt": buffer.getvalue(), "network.json": json.dumps(spec.__dict__).encode()}
    registry.promote("policy", registry.register("policy", files, kind="dqn").version, "production")
    models = RouteModels(DQNPolicy(registry, "policy"))
    small = [0.1, 0.0, 0.2, 0.0]
    with torch.no_grad():
        expected = network(torch.tensor([small])).argmax(1).tolist()

    async def scenario():
        # The heavy lane busy (another big request's work, say): a big request queues
        # behind it there; a small request arriving meanwhile is answered at once.
        release = threading.Event()
        busy = asyncio.ensure_future(models.run("policy", release.wait, heavy=True))
        try:
            await asyncio.sleep(0.05)
            assert MAX_OBSERVATIONS > HEAVY_OBSERVATIONS
            big = asyncio.ensure_future(answer_act(models, "policy", [small] * MAX_OBSERVATIONS))
            await asyncio.sleep(0.05)
            answer = await asyncio.wait_for(answer_act(models, "policy", [small]), 2.0)
            assert answer["actions"] == expected and answer["version"] == 1
            assert not big.done()  # still behind the heavy lane's work
        finally:
            release.set()
        await busy
        assert (await big)["actions"] == expected * MAX_OBSERVATIONS

    asyncio.run(scenario())
