import pytest

from rayline.testing import local_ray


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray (2 CPUs) for the whole test session."""
    with local_ray() as address_info:
        yield address_info
