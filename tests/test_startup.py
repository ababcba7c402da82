"""Start-up: a process's creation time, read from /proc, is on time.time()'s clock; what
`rayline train` loads ahead, and what it keeps off the trial's path to its first step."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from rayline.startup import process_started_unix_s


def test_a_process_creation_time_is_on_the_unix_clock_to_a_tick():
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    after = time.time()
    try:
        created = process_started_unix_s(child.pid)
    finally:
        child.wait()
    tick = 0.01  # /proc counts in clock ticks (USER_HZ = 100)
    assert before - 2 * tick <= created <= after + tick, (before, created, after)


def test_a_process_that_is_gone_has_no_creation_time():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert math.isnan(process_started_unix_s(child.pid))


def test_background_imports_skip_a_module_that_is_not_installed():
    """`rayline train` imports Tune while Ray starts; a module that is missing (Tune's
    optional ones) is skipped without a traceback."""
    code = (
        "import sys\n"
        "from rayline.startup import import_in_background\n"
        "import_in_background(['rayline_not_installed', 'rayline.numbers']).join()\n"
        "print('rayline.numbers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    assert out.stderr == ""


def test_tensorboardx_comes_without_torch_and_still_writes_scalars(tmp_path):
    """Tune's TensorBoard logger gets a tensorboardX that did not import torch (1.7-4 s on
    2 cores); it writes the scalars TensorBoard reads, and torch imports as usual after."""
    code = f"""
import sys
from rayline.startup import import_tensorboardx_without_torch
import_tensorboardx_without_torch()
print("torch" in sys.modules, "tensorboardX" in sys.modules)
from tensorboardX import SummaryWriter
writer = SummaryWriter({str(tmp_path)!r})
writer.add_scalar("eval_return_mean", 475.5, 3)
writer.close()
import torch
print(torch.ones(2).sum().item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "2.0"], out.stdout + out.stderr
    scalars = [
        (event.step, value.tag, value.simple_value)
        for event in read_events(next(tmp_path.glob("events.out.tfevents.*")))
        for value in event.summary.value
    ]
    assert scalars == [(3, "eval_return_mean", 475.5)]


def read_events(path):
    """The Event records of a TensorBoard file (TFRecord: length, its CRC, data, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event()
        event.ParseFromString(data[offset + 12 : offset + 12 + length])
        events.append(event)
        offset += 12 + length + 4
    return events


def test_a_trial_runs_without_a_runtime_env_and_no_secret_reaches_it(
    ray_session, monkeypatch, tmp_path
):
    """Under rayline's Tune settings a trial gets no runtime env of Tune's: one would keep
    it and its actors off the worker processes Ray started ahead, and Tune would put the
    driver's AWS keys in it (secrets never go in a runtime env)."""
    from ray import tune

    from rayline.pipelines import tune_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-runtime-env")
    tune_settings()

    def trainable(config):
        import ray

        env = ray.get_runtime_context().runtime_env
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        tune.report({"runtime_env": json.dumps(env), "secret_seen": secret is not None})

    result = tune.Tuner(
        trainable, run_config=tune.RunConfig(verbose=0, storage_path=str(tmp_path))
    ).fit()[0]
    assert json.loads(result.metrics["runtime_env"]).get("env_vars", {}) == {}
    assert result.metrics["secret_seen"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_running_process_caps_its_allocator_arenas():
    """The driver of a run (`rayline train`, `rayline serve`) caps glibc's arenas itself:
    16 threads that allocate make 2 arenas, not one each (malloc_stats counts them)."""
    code = """
import ctypes, ctypes.util, sys, threading
from rayline.memory import cap_arenas
capped = cap_arenas() if sys.argv[1] == "cap" else False
def allocate():
    for _ in range(100):
        kept = [ctypes.create_string_buffer(2000) for _ in range(200)]
threads = [threading.Thread(target=allocate) for _ in range(16)]
[t.start() for t in threads]; [t.join() for t in threads]
print(capped, flush=True)
ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()
"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    arenas = {}
    for mode in ("cap", "no"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, check=True
        )
        arenas[mode] = (out.stdout.strip(), out.stderr.count("Arena "))
    assert arenas["cap"] == ("True", 2), arenas
    assert arenas["no"][1] > 2, arenas  # the test can tell: uncapped, threads get arenas


def test_a_running_process_takes_arrows_buffers_from_the_system_allocator():
    """The driver switches Arrow's pool itself (pyarrow read the environment when the CLI
    imported it); a pool its environment chose stays."""
    code = """
import pyarrow as pa
from rayline.memory import use_system_arrow_pool
switched = use_system_arrow_pool()
buffer = pa.allocate_buffer(10_000_000)
print(switched, pa.default_memory_pool().backend_name, pa.system_memory_pool().bytes_allocated())
"""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    switched, backend, system_bytes = out.stdout.split()
    assert (switched, backend) == ("True", "system"), out.stderr[-2000:]
    assert int(system_bytes) >= 10_000_000
    env["ARROW_DEFAULT_MEMORY_POOL"] = "mimalloc"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split()[:2] == ["False", "mimalloc"], out.stderr[-2000:]
