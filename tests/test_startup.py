"""Start-up marks: a process's creation time, read from /proc, is on time.time()'s clock."""

import math
import subprocess
import sys
import time

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
    """`rayline train` imports Tune's optional tensorboardX (and so torch) while Ray starts;
    where it is missing, the thread goes on to the next module without a traceback."""
    code = (
        "import sys\n"
        "from rayline.startup import import_in_background\n"
        "import_in_background(['rayline_not_installed', 'rayline.numbers']).join()\n"
        "print('rayline.numbers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    assert out.stderr == ""
