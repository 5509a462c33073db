"""The type rule for what a checkpoint keeps besides tensor data, applied at ``save()`` time.

Every value that is not a tensor DCP writes as data (``extra``, scheduler and dataloader
state, a module's ``get_extra_state()``, optimizer ``param_groups`` and non-tensor
optimizer state) is read back with ``torch.load(weights_only=True)``, whose unpickler
resolves only a fixed set of types.  ``plain`` applies one rule, so that every value
``save()`` accepts restores, equal in value:

- kept as they are: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
  ``bytes``, ``bytearray``, ``torch.Size``, ``torch.dtype``, ``torch.device``, and
  ``dict``, ``list``, ``tuple``, ``set``, ``collections.OrderedDict`` and
  ``collections.Counter`` of plain values;
- converted: numpy scalars (``np.float64``, what ``np.mean`` returns, ``np.int64``,
  ``np.str_``, ``np.bool_``) to ``.item()``; enum members (``Enum``, ``IntEnum``,
  ``StrEnum``, ``Flag``) to ``.value``; namedtuples and other tuple subclasses to
  ``tuple``; ``defaultdict`` and other mappings to ``dict``; list and set subclasses to
  ``list`` and ``set``; subclasses of ``str``, ``int``, ``float``, ``bytes`` to the base
  type;
- dict keys: after the same conversion, a ``str`` or an ``int``; in model and optimizer
  state a ``str`` (DCP walks those dicts and restores every key as a ``str``);
- tensors in ``extra``, scheduler and dataloader state (serialised with the value):
  ``torch.Tensor`` or ``nn.Parameter`` of any layout (dense, sparse COO/CSR/CSC/BSR/BSC,
  quantized, meta, strided nested), kept exactly by ``torch.save``;
- tensors in model and optimizer state (parameters, buffers, optimizer state, extra
  state, param groups; DCP writes them as data and staging copies them): dense tensors,
  ``nn.Parameter``, ``DTensor``, and subclasses without their own ``__torch_dispatch__``
  (their data is a plain tensor's); DCP loads them into the live tensors, and fills the
  live dicts and lists of that state in place, so those keep the live types;
- everything else is refused with ``ConfigError`` naming the key path and the type:
  numpy arrays, ``frozenset``, ``datetime``, functions, custom classes, other tensor
  subclasses (in ``extra``: any but ``nn.Parameter``; in model and optimizer state: those
  with their own ``__torch_dispatch__``, whose data DCP would restore wrong), and sparse,
  quantized, meta and nested tensors in model and optimizer state (DCP and staging copy
  only dense data: those would fail or come back wrong).

The walk copies a container only when something inside it changed, so a large optimizer
state that is already plain costs one pass over it and no copies.
"""

from __future__ import annotations

import collections
import enum
import itertools
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._torch_compat import DTensor
from .errors import ConfigError

_KEPT = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray,
                   torch.Size, torch.dtype, torch.device})
_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
_BASES = (str, int, float, complex, bytes, bytearray)
_BLOB_TENSORS = (torch.Tensor, nn.Parameter)
_STRIDED = torch.strided
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__  # what a subclass that defines none has
_EXPECTED = ("expected plain values (None, bool, int, float, str, bytes, tensors, and "
             "dicts, lists, tuples and sets of them)")


def _spell(path: Any) -> str:
    """A key path as users write it.  The walk builds paths as it goes down, cheaply, and
    spells one out only for an error: ``(parent, how, key)`` or None (the value itself),
    ``how`` one of ``"["`` (an item), ``"key"`` (a dict key), ``"."`` (an attribute)."""
    parts = []
    while path is not None:
        path, how, key = path
        parts.append(f"[{key!r}]" if how == "[" else f" key {key!r}" if how == "key" else f".{key}")
    return "".join(reversed(parts))


class _Walk:
    """One pass over one value; ``dcp``: it is model or optimizer state, which DCP walks
    (writing its tensors as data) and staging copies."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.active: set[int] = set()

    def refuse(self, path: Any, value: Any, why: str = _EXPECTED) -> ConfigError:
        kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
        return ConfigError(f"{self.where}{_spell(path)} is a {kind}; {why}")

    def value(self, v: Any, path: Any, dcp: bool) -> Any:
        t = type(v)
        if t is torch.Tensor and dcp and v.layout is _STRIDED and not (
                v.is_quantized or v.is_meta or v.is_nested):
            return v  # most of a large optimizer state: the fast path
        if t in _KEPT:
            return v
        if isinstance(v, torch.Tensor):
            return self.dcp_tensor(v, path) if dcp else self.tensor(v, path)
        if isinstance(v, enum.Enum):
            return self.value(v.value, path, dcp)
        np = sys.modules.get("numpy")
        if np is not None and isinstance(v, (np.generic, np.ndarray)):
            return self.numpy(v, path, np)
        if isinstance(v, _BASES):
            return _base_copy(v)
        if isinstance(v, (Mapping, list, tuple, set)):
            return self.container(v, path, dcp)
        raise self.refuse(path, v)

    def numpy(self, v: Any, path: Any, np: Any) -> Any:
        if isinstance(v, np.ndarray):
            raise self.refuse(path, v, "convert it with torch.from_numpy() or .tolist()")
        item = v.item()
        if isinstance(item, np.generic):  # np.longdouble, np.clongdouble: no Python type
            raise self.refuse(path, v, "convert it to a float or a tensor")
        return self.value(item, path, False)

    def container(self, v: Any, path: Any, dcp: bool) -> Any:
        if id(v) in self.active:
            raise self.refuse(path, v, "it contains itself")
        self.active.add(id(v))
        try:
            if isinstance(v, Mapping):
                return self.mapping(v, path, dcp)
            new = [self.value(x, (path, "[", i), dcp) for i, x in enumerate(v)]
        finally:
            self.active.discard(id(v))
        kind = list if isinstance(v, list) else tuple if isinstance(v, tuple) else set
        if type(v) is kind and all(a is b for a, b in zip(new, v)):
            return v
        return kind(new)

    def mapping(self, v: Mapping[Any, Any], path: Any, dcp: bool) -> Any:
        """A copy only from the first item that changes (a plain optimizer state: none)."""
        kind = type(v) if type(v) in _MAPPINGS else dict
        out: dict[Any, Any] | None = None if kind is type(v) else {}
        value = self.value
        for i, (old, x) in enumerate(v.items()):
            k = old if type(old) is str else self.key(old, path, dcp)
            n = value(x, (path, "[", k), dcp)
            if n is not x or k is not old or out is not None:
                out = self.copy_from(v, i, out)
                if k in out:
                    raise self.refuse((path, "key", old), old, f"it becomes {k!r}, already a key")
                out[k] = n
        if out is None:
            return v
        return out if kind is dict else kind(out)

    @staticmethod
    def copy_from(v: Mapping[Any, Any], i: int, out: dict[Any, Any] | None) -> dict[Any, Any]:
        """``out``, or a copy of the items before the ``i``-th, the first that changed."""
        return out if out is not None else dict(itertools.islice(v.items(), i))

    def key(self, k: Any, path: Any, dcp: bool) -> Any:
        allowed = (str,) if dcp else (str, int, bool)
        if type(k) in allowed:
            return k
        try:
            new = self.value(k, (path, "key", k), False)
        except ConfigError:
            new = None
        if type(new) not in allowed:
            why = ("dict keys in model and optimizer state must be a str (DCP restores any "
                   "other key as a str)" if dcp else "dict keys must be a str or int")
            raise self.refuse((path, "key", k), k, why)
        return new

    def tensor(self, t: torch.Tensor, path: Any) -> torch.Tensor:
        if type(t) not in _BLOB_TENSORS:
            raise self.refuse(path, t, "tensor subclasses other than nn.Parameter do not "
                                       "load weights-only; save a plain tensor")
        attrs = getattr(t, "__dict__", None)
        if attrs:
            mine = dict(attrs)
            if self.value(mine, (path, ".", "__dict__"), False) is not mine:
                raise self.refuse((path, ".", "__dict__"), t,
                                  "tensor attributes must be plain values as they are")
        return t

    def dcp_tensor(self, t: torch.Tensor, path: Any) -> torch.Tensor:
        if isinstance(t, DTensor):
            return t
        if type(t).__torch_dispatch__ is not _PLAIN_DISPATCH:
            raise self.refuse(path, t, "DCP writes only the plain data of a tensor; a "
                                       "subclass with its own __torch_dispatch__ would "
                                       "restore wrong")
        odd = _odd_kind(t)
        if odd:
            raise self.refuse(path, t, f"it is a {odd} tensor, and DCP writes only dense "
                                       "tensors as data")
        return t


def _odd_kind(t: torch.Tensor) -> str:
    if t.is_nested:
        return "nested"
    if t.layout != torch.strided:
        return str(t.layout).removeprefix("torch.")
    if t.is_quantized:
        return "quantized"
    if t.is_meta:
        return "meta (no data)"
    return ""


def _base_copy(v: Any) -> Any:
    """A subclass of a builtin scalar as the builtin itself, ignoring overridden dunders."""
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, int):
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, complex):
        return complex(float.__float__(v.real), float.__float__(v.imag))
    return type(v).__mro__[-2](memoryview(v))  # bytes or bytearray


def plain(value: Any, where: str, *, dcp: bool = False) -> Any:
    """``value`` under the type rule (the same object when nothing needed converting), or
    ``ConfigError`` naming ``where`` plus the key path and the type.

    ``dcp``: ``value`` is a model or optimizer state dict that DCP walks; its tensors
    there must be ones DCP writes exactly.
    """
    try:
        return _Walk(where).value(value, None, dcp)
    except RecursionError as e:
        raise ConfigError(f"{where} is nested too deeply to save") from e
