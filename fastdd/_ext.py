"""Loads the compiled extension fastdd._C when it matches the running torch; otherwise warns once."""
import importlib
import importlib.util
import os
import warnings

import torch

_state = {"loaded": False, "reason": "not attempted", "build_info": {}}


def load() -> bool:
    """Import fastdd._C (registering its kernels with the dispatcher). Never raises."""
    if _state["reason"] != "not attempted":
        return _state["loaded"]
    if os.environ.get("FASTDD_DISABLE_EXT", "0") == "1":
        _state["reason"] = "disabled by FASTDD_DISABLE_EXT=1"
        return False
    if importlib.util.find_spec("fastdd._C") is None:
        _state["reason"] = "not compiled (pure-Python install or FASTDD_BUILD_EXT=0)"
        return False
    try:
        from fastdd import _build_info
    except ImportError:
        _build_info = None
    if _build_info is not None and _build_info.TORCH_VERSION != torch.__version__:
        _state["reason"] = (f"fastdd._C was built against torch {_build_info.TORCH_VERSION} but torch "
                            f"{torch.__version__} is running")
        warnings.warn(f"{_state['reason']}; using the pure-torch reference ops. Rebuild with "
                      "`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)
        return False
    try:
        module = importlib.import_module("fastdd._C")
    except ModuleNotFoundError as err:
        if err.name != "fastdd._C":
            raise
        _state["reason"] = "not compiled (pure-Python install or FASTDD_BUILD_EXT=0)"
        return False
    except (ImportError, OSError) as err:
        _state["reason"] = f"fastdd._C failed to load: {err}"
        warnings.warn(f"{_state['reason']}; using the pure-torch reference ops. Rebuild with "
                      "`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)
        return False
    _state.update(loaded=True, reason="loaded", build_info=dict(module.build_info()))
    return True


def loaded() -> bool:
    return load()


def status() -> dict:
    load()
    return dict(_state)
