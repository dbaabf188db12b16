"""Imports distmulti before anything imports chainer (its compatibility layer must come first
on numpy 2), and skips tests marked ``gpu`` without a usable CUDA GPU and CuPy."""
import pytest

import distmulti  # noqa: F401


def _gpu_reason():
    try:
        import cupy
    except ImportError:
        return 'CuPy is not installed (pip install ".[gpu]")'
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return 'no CUDA GPU on this machine'
    except Exception as e:  # no driver
        return f'no usable CUDA GPU ({type(e).__name__})'
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if 'gpu' in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f'GPU test: {reason}'))
