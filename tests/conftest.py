import pytest

from rayline.testing import local_ray

# The files that take longest, longest first (`make test`, --junitxml, 2026-12-07: seconds
# of test time each, module fixtures included). `make test` hands whole files to its two
# workers in collection order (--no-loadscope-reorder; xdist's own order, most tests
# first, left a two-test file of 150 s to start last, with one worker idle while it ran).
# A file left off this list only runs after these: keep a new file of over ~15 s here.
LONGEST_FILES = [
    "test_boosting.py",  # 144
    "test_dqn_faults.py",  # 140
    "test_dqn_learning.py",  # 133
    "test_monitoring.py",  # 125
    "test_serving.py",  # 114
    "test_prometheus.py",  # 91 (its rayline serve and Prometheus)
    "test_hosts.py",  # 75
    "test_gpu_check.py",  # 64
    "test_mlflow.py",  # 64 (its MLflow server)
    "test_vision.py",  # 52
    "test_packaging.py",  # 41
    "test_serving_cluster.py",  # 39
    "test_family.py",  # 37
    "test_minatar.py",  # 35
    "test_kernels.py",  # 35
    "test_segmentation.py",  # 33
    "test_atari.py",  # 32
    "test_export.py",  # 25
    "test_recsys.py",  # 20
    "test_inference_protocol.py",  # 20
    "test_front.py",  # 18
    "test_bench_compare.py",  # 17
    "test_cli.py",  # 15
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order in a file kept


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray (2 CPUs) for the whole test session."""
    with local_ray() as address_info:
        yield address_info
