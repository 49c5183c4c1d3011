"""Host synchronisations, checked on a CPU: what would make a GPU wait for the host.

A GPU synchronises with the host whenever the host needs a value it computed: a Python number
(``.item()``, ``bool``, ``int``, ``.tolist()``), an output whose size depends on the data
(``nonzero``, boolean indexing, ``bincount``, ``unique``, ``repeat_interleave`` without its
``output_size``), a linear-algebra kernel that checks its ``info`` on the host (an SVD or an
eigendecomposition always, the ``*_ex`` functions with ``check_errors=True``), a histogram
that finds its own range, and a blocking copy of host data to the device (``torch.tensor`` of
Python values given a ``device``).  On a CPU nothing waits, so the check looks at what the code
asks for: every ATen operator it dispatches, in forward and backward passes (a
``TorchDispatchMode`` also sees what composite operators such as ``torch.linalg.solve``
decompose into; kernels that synchronise inside, such as the SVD's, are known by name), plus
what dispatches nothing on a CPU tensor: ``tolist``, ``numpy``, ``cpu`` and
``torch.tensor(data, device=...)``.  A CPU tensor moved with ``.to(device)`` dispatches nothing
on a CPU either: that copy stays invisible here.

``assert_no_host_sync()`` raises :class:`HostSyncError` if the block would synchronise;
``recorded_host_syncs()`` yields the list of what it found, for code with a deliberate read.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "assert_no_host_sync", "recorded_host_syncs", "sync_reason"]

# Operators that always make the host wait for the device.
ALWAYS = {
    "_local_scalar_dense": "a tensor read as a Python number (.item(), bool(), int(), float())",
    "is_nonzero": "a tensor read as a Python bool",
    "equal": "torch.equal returns a Python bool",
    "nonzero": "nonzero: an output sized by the data",
    "nonzero_numpy": "torch.where(cond) / nonzero: an output sized by the data",
    "argwhere": "argwhere: an output sized by the data",
    "masked_select": "masked_select: an output sized by the data",
    "bincount": "bincount: its length is the data's maximum",
    "_unique": "unique: an output sized by the data",
    "_unique2": "unique: an output sized by the data",
    "unique_dim": "unique: an output sized by the data",
    "unique_consecutive": "unique_consecutive: an output sized by the data",
    "unique_dim_consecutive": "unique_consecutive: an output sized by the data",
    "_linalg_check_errors": "a linear-algebra error check on the host",
    "_linalg_svd": "an SVD checks its convergence on the host",
    "_linalg_eigh": "an eigendecomposition checks its convergence on the host",
    "linalg_eig": "an eigendecomposition checks its convergence on the host",
}


class HostSyncError(AssertionError):
    """Code under :func:`assert_no_host_sync` asked for something that synchronises a GPU."""


def _argument(func, args, kwargs, name: str):
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[position] if position < len(args) else argument.default_value
    return None


def _boolean_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def sync_reason(func, args, kwargs) -> str:
    """Why ``func(*args, **kwargs)`` synchronises a GPU with the host, or '' if it does not."""
    name = func._schema.name.split("::")[-1]
    if name in ALWAYS:
        return ALWAYS[name]
    if name.startswith("repeat_interleave") and _argument(func, args, kwargs, "output_size") is None \
            and func._overloadname != "self_int":
        return "repeat_interleave without output_size: an output sized by the data"
    if name in ("index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_") \
            and _boolean_index(_argument(func, args, kwargs, "indices")):
        return "boolean-mask indexing: an output sized by the data"
    if _argument(func, args, kwargs, "check_errors") is True:
        return f"{name} with check_errors=True checks on the host"
    if name == "histc" and _argument(func, args, kwargs, "min") == _argument(func, args, kwargs, "max"):
        return "histc without min < max reads the data's range"
    return ""


class _Detector(TorchDispatchMode):
    def __init__(self, found: List[str]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason:
            self.found.append(f"{func}: {reason}")
        return func(*args, **kwargs)


def _recording(found: List[str], what: str, original, host_data_only: bool = False):
    def wrapper(*args, **kwargs):
        data = args[0] if args else kwargs.get("data")
        if not host_data_only or (kwargs.get("device") is not None and not isinstance(data, torch.Tensor)):
            found.append(what)
        return original(*args, **kwargs)
    return wrapper


_TENSOR_READS = ("tolist", "numpy", "cpu")
_HOST_DATA = ("tensor", "as_tensor")


@contextlib.contextmanager
def recorded_host_syncs() -> Iterator[List[str]]:
    """Yield a list that collects, while the block runs, every host synchronisation it asks for."""
    found: List[str] = []
    tensor_methods = {name: getattr(torch.Tensor, name) for name in _TENSOR_READS}
    factories = {name: getattr(torch, name) for name in _HOST_DATA}
    try:
        for name, method in tensor_methods.items():
            setattr(torch.Tensor, name, _recording(found, f"Tensor.{name}(): a tensor read on the host", method))
        for name, factory in factories.items():
            setattr(torch, name, _recording(found, f"torch.{name}(host data, device=...): a blocking copy",
                                            factory, host_data_only=True))
        with _Detector(found):
            yield found
    finally:
        for name, method in tensor_methods.items():
            setattr(torch.Tensor, name, method)
        for name, factory in factories.items():
            setattr(torch, name, factory)


@contextlib.contextmanager
def assert_no_host_sync() -> Iterator[None]:
    """Raise :class:`HostSyncError` if the block (forward and backward alike) would synchronise a
    GPU with the host."""
    with recorded_host_syncs() as found:
        yield
    if found:
        raise HostSyncError("host synchronisations:\n  " + "\n  ".join(dict.fromkeys(found)))
