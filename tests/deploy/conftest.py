"""The CPU image, built once per session for every test that runs it (skipped, with the
reason, without root or podman)."""
import pytest

from tests.deploy import images


@pytest.fixture(scope='session')
def cpu_image():
    reason = images.missing_reason()
    if reason:
        pytest.skip(reason)
    return images.build_cpu_image()
