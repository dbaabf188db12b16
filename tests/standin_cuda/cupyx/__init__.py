"""Stand-in for cupyx, next to the CuPy stand-in (see ../README.md)."""
import importlib.machinery
import sys
import types

for _name in ('cupyx.scipy', 'cupyx.scipy.linalg', 'cupyx.scipy.special'):
    _m = types.ModuleType(_name)
    _m.__spec__ = importlib.machinery.ModuleSpec(_name, None, is_package=True)
    _m.__path__ = []
    sys.modules[_name] = _m
sys.modules['cupyx'].scipy = sys.modules['cupyx.scipy']
sys.modules['cupyx.scipy'].linalg = sys.modules['cupyx.scipy.linalg']
sys.modules['cupyx.scipy'].special = sys.modules['cupyx.scipy.special']
