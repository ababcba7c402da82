import pytest

from rayline.testing import local_ray

# The files that take longest, longest first (`make test`, --durations=0, 2026-12-07
# evening: seconds of test time each, module fixtures included). `make test` hands whole
# files to its two workers in collection order (--no-loadscope-reorder; xdist's own
# order, most tests first, left a two-test file of 150 s to start last, with one worker
# idle while it ran).
# A file left off this list only runs after these: keep a new file of over ~15 s here.
LONGEST_FILES = [
    "test_dqn_faults.py",  # 151
    "test_dqn_learning.py",  # 120
    "test_serving.py",  # 111
    "test_monitoring.py",  # 109
    "test_boosting.py",  # 109
    "test_vision.py",  # 90
    "test_prometheus.py",  # 85 (its rayline serve and Prometheus)
    "test_mlflow.py",  # 79 (its MLflow server)
    "test_hosts.py",  # 75 (as root only)
    "test_gpu_check.py",  # 71
    "test_segmentation.py",  # 61
    "test_serving_cluster.py",  # 46
    "test_packaging.py",  # 45
    "test_family.py",  # 44
    "test_kernels.py",  # 42
    "test_atari.py",  # 40
    "test_minatar.py",  # 39
    "test_bench_compare.py",  # 22
    "test_recsys.py",  # 22
    "test_rainbow.py",  # 21
    "test_inference_protocol.py",  # 20
    "test_front.py",  # 19
    "test_cli.py",  # 18
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order in a file kept


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray (2 CPUs) for the whole test session."""
    with local_ray() as address_info:
        yield address_info
