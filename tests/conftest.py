import pytest

from rayline.testing import local_ray

# The files that take longest, longest first (`make test`, --durations=0, 2026-12-06:
# seconds of test time each). `make test` hands whole files to its two workers in
# collection order (--no-loadscope-reorder; xdist's own order, most tests first, left a
# two-test file of 150 s to start last, with one worker idle while it ran). A file left
# off this list only runs after these.
LONGEST_FILES = [
    "test_monitoring.py",  # 202
    "test_serving.py",  # 201
    "test_boosting.py",  # 151
    "test_hosts.py",  # 150
    "test_dqn_learning.py",  # 139
    "test_dqn_faults.py",  # 125
    "test_prometheus.py",  # 75 (its rayline serve and Prometheus)
    "test_vision.py",  # 80
    "test_gpu_check.py",  # 79
    "test_segmentation.py",  # 54
    "test_packaging.py",  # 48
    "test_kernels.py",  # 43
    "test_family.py",  # 42
    "test_atari.py",  # 40
    "test_serving_cluster.py",  # 31
    "test_recsys.py",  # 29
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order in a file kept


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray (2 CPUs) for the whole test session."""
    with local_ray() as address_info:
        yield address_info
