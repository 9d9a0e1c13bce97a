"""refopt: reference implementation, specification and conformance suite for SAVEUS and DOPE.

    import refopt
    opt = refopt.DOPE()
    state = opt.init(param)
    new_param, new_state = opt.step(param, grad, state)   # pure; any array-API library
"""
from ._state import DOPEState, SAVEUSState
from .dope import DOPE
from .quirks import Quirks
from .registry import PROFILES
from .saveus import SAVEUS

__version__ = "2.1.0"
#: Version of the normative text in spec/ that this code implements.
SPEC_VERSION = "2.0.0"



def __getattr__(name):
    # Framework adapters load on first use, so `import refopt` needs only numpy.
    if name in ("torch", "optax", "conformance", "builders", "registry"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'refopt' has no attribute {name!r}")


__all__ = ["SAVEUS", "DOPE", "SAVEUSState", "DOPEState", "Quirks", "PROFILES", "__version__", "SPEC_VERSION"]
