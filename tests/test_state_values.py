"""The type rule of values.py, through a real CheckpointManager: every value save() accepts
restores equal in value (with the documented type), and every other one is refused at
save() with a ConfigError naming the key path and the type, with nothing committed.

Each value is tried where users put it: in ``extra``, in a module's ``get_extra_state()``,
in an optimizer param group and in an LR scheduler's state.  Tensors of odd kinds are
tried in ``extra``, in model buffers, in optimizer state and in extra state.
"""

from __future__ import annotations

import collections
import collections.abc
import datetime
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.errors import ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(str, enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Perm(enum.Flag):
    R = 1
    W = 2


Pair = collections.namedtuple("Pair", "a b")


class MyStr(str):
    def __str__(self) -> str:
        return "overridden"


class MyKey(str):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyBytes(bytes):
    pass


class MyDict(dict):
    pass


class MyList(list):
    pass


class Marked(torch.Tensor):
    """A subclass without its own __torch_dispatch__ (its data is a plain tensor's)."""


class Custom:
    pass


def _looped() -> list[Any]:
    v: list[Any] = [1]
    v.append(v)
    return v


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[int], Any]
    """The value; n=1 for the saved state, n=2 for the live one restored into."""
    expect: Callable[[int], Any] | None
    """The restored value for n=1 (types included); None: refused at save()."""
    refused: tuple[str, str] = ("", "")
    """For a refused value: the key path below the value and the type the message names."""
    dcp_refused: tuple[str, str] | None = None
    """Refused in model and optimizer state only (``refused`` there)."""


ACCEPTED = [
    Case("np-float64", lambda n: np.mean([n, n + 1.0]), lambda n: n + 0.5),
    Case("np-float32", lambda n: np.float32(n / 4), lambda n: n / 4),
    Case("np-int64", lambda n: np.int64(n), lambda n: n),
    Case("np-str", lambda n: np.str_(f"s{n}"), lambda n: f"s{n}"),
    Case("np-bool", lambda n: np.bool_(n == 1), lambda n: n == 1),
    Case("enum", lambda n: [Color.RED, Color.BLUE][n - 1], lambda n: ["red", "blue"][n - 1]),
    Case("int-enum", lambda n: Level(n), lambda n: n),
    Case("str-enum", lambda n: [Mode.TRAIN, Mode.EVAL][n - 1], lambda n: ["train", "eval"][n - 1]),
    Case("flag", lambda n: Perm(n), lambda n: n),
    Case("namedtuple", lambda n: Pair(n, np.float64(n)), lambda n: (n, float(n))),
    Case("defaultdict", lambda n: collections.defaultdict(list, {"a": [n]}), lambda n: {"a": [n]}),
    Case("ordereddict", lambda n: collections.OrderedDict(a=n, b=Level(n)),
         lambda n: collections.OrderedDict(a=n, b=n)),
    Case("counter", lambda n: collections.Counter(a=n), lambda n: collections.Counter(a=n)),
    Case("str-subclass", lambda n: MyStr(f"s{n}"), lambda n: f"s{n}"),
    Case("int-subclass", lambda n: MyInt(n), lambda n: n),
    Case("float-subclass", lambda n: MyFloat(n / 2), lambda n: n / 2),
    Case("bytes-subclass", lambda n: MyBytes(bytes([n])), lambda n: bytes([n])),
    Case("dict-subclass", lambda n: MyDict(a=n), lambda n: {"a": n}),
    Case("list-subclass", lambda n: MyList([n, np.int64(n)]), lambda n: [n, n]),
    Case("numpy-and-enum-keys", lambda n: {np.int64(1): n, Level.HIGH: "y", MyKey("k"): n},
         lambda n: {1: n, 2: "y", "k": n}, dcp_refused=(" key np.int64(1)", "numpy.int64")),
    Case("nested-mix", lambda n: {"hist": [np.float64(n), Level(n), (Color.RED, n)]},
         lambda n: {"hist": [float(n), n, ("red", n)]}),
    Case("plain-kept", lambda n: {"s": {n, 3}, "c": complex(n, 1), "ba": bytearray(b"x"),
                                  "size": torch.Size([n]), "dt": torch.float16,
                                  "dev": torch.device("cpu"), "none": None},
         lambda n: {"s": {n, 3}, "c": complex(n, 1), "ba": bytearray(b"x"),
                    "size": torch.Size([n]), "dt": torch.float16,
                    "dev": torch.device("cpu"), "none": None}),
]

REFUSED = [
    Case("datetime", lambda n: datetime.datetime(2020, 1, n), None, ("", "datetime.datetime")),
    Case("frozenset", lambda n: frozenset({n}), None, ("", "frozenset")),
    Case("ndarray", lambda n: np.arange(n), None, ("", "numpy.ndarray")),
    Case("custom-object", lambda n: Custom(), None, ("", "Custom")),
    Case("function", lambda n: len, None, ("", "builtin_function_or_method")),
    Case("deep-in-list", lambda n: [1, {"when": datetime.date(2020, 1, n)}], None,
         ("[1]['when']", "datetime.date")),
    Case("float-key", lambda n: {1.5: n}, None, (" key 1.5", "float")),
    Case("colliding-keys", lambda n: {"red": 1, Color.RED: n}, None, (" key <Color.RED", "Color")),
    Case("contains-itself", lambda n: _looped(), None, ("[1]", "list")),
]


def _same(a: Any, b: Any, *, live_dicts: bool = False) -> bool:
    """Equal in value and in type, all the way down; ``live_dicts``: any mapping types (DCP
    fills the live dicts of model and optimizer state in place)."""
    if live_dicts and isinstance(a, collections.abc.Mapping) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], live_dicts=True) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], live_dicts=live_dicts) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, live_dicts=live_dicts) for x, y in zip(a, b))
    return a == b


class Holder(nn.Module):
    """A module whose extra state is any value."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.value = value

    def get_extra_state(self) -> Any:
        return self.value

    def set_extra_state(self, state: Any) -> None:
        self.value = state


class Loader:
    """A dataloader-like object whose state is any value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["v"]


def _extra(value: Any) -> TrainState:
    return TrainState(extra={"v": value}, rng=False)


def _extra_state(value: Any) -> TrainState:
    return TrainState(model=Holder(value), rng=False)


def _param_group(value: Any) -> TrainState:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.param_groups[0]["v"] = value
    return TrainState(model=model, optimizer=opt, rng=False)


def _scheduler(value: Any) -> TrainState:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    sched.v = value  # a scheduler's state_dict() is its __dict__ without the optimizer
    return TrainState(model=model, optimizer=opt, scheduler=sched, rng=False)


DCP_PLACES = {"extra-state", "param-group"}
"""Where DCP walks the dicts and lists and fills the live ones in place."""

PLACES: dict[str, tuple[Callable[[Any], TrainState], Callable[[TrainState], Any], str]] = {
    "extra": (_extra, lambda s: s.extra["v"], "TrainState extra['v']"),
    "extra-state": (_extra_state, lambda s: s.models["model"].value,
                    "model 'model' state_dict()['_extra_state']"),
    "param-group": (_param_group, lambda s: s.optimizers["optimizer"].param_groups[0]["v"],
                    "optimizer 'optimizer' state_dict()['param_groups'][0]['v']"),
    "scheduler": (_scheduler, lambda s: s.schedulers["scheduler"].v,
                  "scheduler 'scheduler' state_dict()['v']"),
    "dataloader": (lambda v: TrainState(dataloader=Loader(v), rng=False),
                   lambda s: s.dataloaders["dataloader"].value,
                   "dataloader 'dataloader' state_dict()['v']"),
}


def _round_trip(root: Any, src: TrainState, dst: TrainState) -> None:
    with CheckpointManager(root) as mgr:
        mgr.save(1, src).result(timeout=120)
    with CheckpointManager(root) as mgr:
        assert mgr.restore(dst) == 1


def _assert_refused(root: Any, state: TrainState, *needles: str) -> None:
    with CheckpointManager(root) as mgr:
        with pytest.raises(ConfigError) as err:
            mgr.save(1, state)
        assert mgr.list() == []
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not (root / "step-0000000001").exists()


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.id)
def test_accepted_value_restores_equal_with_the_documented_type(tmp_path, place, case):
    build, read, where = PLACES[place]
    if place in DCP_PLACES and case.dcp_refused:
        _assert_refused(tmp_path / "ckpt", build(case.make(1)), where + case.dcp_refused[0],
                        case.dcp_refused[1], "must be a str")
        return
    src, dst = build(case.make(1)), build(case.make(2))
    _round_trip(tmp_path / "ckpt", src, dst)
    got, want = read(dst), case.expect(1)
    assert _same(got, want, live_dicts=place in DCP_PLACES), (got, want)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_refused_value_fails_save_naming_its_key_path_and_type(tmp_path, place, case):
    build, _, where = PLACES[place]
    sub, kind = case.refused
    _assert_refused(tmp_path / "ckpt", build(case.make(1)), where + sub, kind)


@pytest.mark.parametrize("place", ["extra", "scheduler"])
@pytest.mark.parametrize("make", [lambda: torch.zeros(2).as_subclass(Marked),
                                  lambda: TwoTensor(torch.zeros(2), torch.ones(2))],
                         ids=["subclass", "wrapper-subclass"])
def test_tensor_subclass_in_a_pickled_value_is_refused(tmp_path, place, make):
    build, _, where = PLACES[place]
    _assert_refused(tmp_path / "ckpt", build(make()), where, type(make()).__name__)


def test_tensor_attributes_are_kept_when_plain_and_refused_when_not(tmp_path):
    good, bad = torch.ones(2), torch.ones(2)
    good.note, bad.note = {"n": 1}, np.float64(1.0)
    dst = TrainState(extra={}, rng=False)
    _round_trip(tmp_path / "ok", TrainState(extra={"t": good}, rng=False), dst)
    assert dst.extra["t"].note == {"n": 1} and torch.equal(dst.extra["t"], good)
    _assert_refused(tmp_path / "bad", TrainState(extra={"t": bad}, rng=False),
                    "TrainState extra['t'].__dict__", "torch.Tensor")


def test_saved_value_is_not_changed_in_the_live_state(tmp_path):
    value = {"m": np.float64(0.5), "pair": Pair(1, 2)}
    state = _extra(value)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, state).result(timeout=120)
    assert type(value["m"]) is np.float64 and type(value["pair"]) is Pair


# -- tensors of odd kinds ------------------------------------------------------------------

def _quantized(n: int) -> torch.Tensor:
    return torch.quantize_per_tensor(torch.arange(4.0) * n, 0.5, 2, torch.qint8)


def _quantized_channels(n: int) -> torch.Tensor:
    return torch.quantize_per_channel(torch.ones(2, 3) * n, torch.tensor([0.1, 0.2]),
                                      torch.tensor([0, 1]), 0, torch.quint8)


ODD_TENSORS: dict[str, Callable[[int], torch.Tensor]] = {
    "sparse-coo": lambda n: (torch.eye(3) * n).to_sparse(),
    "sparse-csr": lambda n: (torch.eye(3) * n).to_sparse_csr(),
    "sparse-csc": lambda n: (torch.eye(3) * n).to_sparse_csc(),
    "sparse-bsr": lambda n: (torch.eye(4) * n).to_sparse_bsr((2, 2)),
    "quantized": _quantized,
    "quantized-per-channel": _quantized_channels,
    "meta": lambda n: torch.empty(n, 3, device="meta"),
    "nested": lambda n: torch.nested.nested_tensor([torch.ones(2) * n, torch.ones(3)]),
}


def _tensors_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly the same tensor: type, layout, dtype, shape, device and data."""
    if (type(a), a.layout, a.dtype, a.device, a.is_nested) != \
            (type(b), b.layout, b.dtype, b.device, b.is_nested):
        return False
    if a.is_nested:
        return all(map(torch.equal, a.unbind(), b.unbind()))
    if a.shape != b.shape:
        return False
    if a.is_meta:
        return True
    if a.is_quantized:
        return a.qscheme() == b.qscheme() and torch.equal(a.int_repr(), b.int_repr()) and \
            torch.equal(a.dequantize(), b.dequantize())
    if a.layout != torch.strided:
        return torch.equal(a.to_dense(), b.to_dense())
    return torch.equal(a, b)


@pytest.mark.parametrize("kind", [*ODD_TENSORS, "parameter"])
def test_odd_tensor_in_extra_round_trips_exactly(tmp_path, kind):
    make = ODD_TENSORS.get(kind, lambda n: nn.Parameter(torch.ones(2) * n))
    saved = {"t": make(1), "in_list": [make(1)]}
    dst = TrainState(extra={}, rng=False)
    _round_trip(tmp_path / "ckpt", TrainState(extra=saved, rng=False), dst)
    assert _tensors_same(dst.extra["t"], saved["t"])
    assert _tensors_same(dst.extra["in_list"][0], saved["in_list"][0])


@pytest.mark.parametrize("kind", [*ODD_TENSORS, "wrapper-subclass"])
def test_odd_tensor_in_model_state_is_refused_naming_its_key(tmp_path, kind):
    make = ODD_TENSORS.get(kind, lambda n: TwoTensor(torch.zeros(2), torch.ones(2)))
    model = nn.Linear(2, 2)
    model.register_buffer("odd", make(1))
    _assert_refused(tmp_path / "ckpt", TrainState(model=model, rng=False),
                    "model 'model' state_dict()['odd']", "torch.Tensor" if kind in ODD_TENSORS
                    else "TwoTensor")


def _trained(odd: torch.Tensor) -> TrainState:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.state[model.weight]["odd"] = odd
    return TrainState(model=model, optimizer=opt, rng=False)


@pytest.mark.parametrize("kind", [*ODD_TENSORS, "wrapper-subclass"])
def test_odd_tensor_in_optimizer_state_is_refused_naming_its_key(tmp_path, kind):
    make = ODD_TENSORS.get(kind, lambda n: TwoTensor(torch.zeros(2), torch.ones(2)))
    _assert_refused(tmp_path / "ckpt", _trained(make(1)),
                    "optimizer 'optimizer' state_dict()['state']['weight']['odd']")


@pytest.mark.parametrize("kind", ODD_TENSORS)
@pytest.mark.parametrize("box", [lambda t: {"t": t}, lambda t: ("x", t)], ids=["dict", "tuple"])
def test_odd_tensor_in_extra_state_is_refused_naming_its_key(tmp_path, kind, box):
    """Model state, extra state included, is DCP's and staging's: dense tensors only."""
    sub = "['t']" if isinstance(box(None), dict) else "[1]"
    _assert_refused(tmp_path / "ckpt", _extra_state(box(ODD_TENSORS[kind](1))),
                    "model 'model' state_dict()['_extra_state']" + sub)


def test_tensor_subclass_without_dispatch_round_trips_in_model_and_optimizer(tmp_path):
    src = _trained(torch.arange(3.0).as_subclass(Marked))
    src.models["model"].register_buffer("marked", torch.arange(2.0).as_subclass(Marked))
    dst = _trained(torch.zeros(3).as_subclass(Marked))
    dst.models["model"].register_buffer("marked", torch.zeros(2).as_subclass(Marked))
    _round_trip(tmp_path / "ckpt", src, dst)
    got = dst.models["model"].marked
    assert type(got) is Marked and torch.equal(got, torch.arange(2.0))
    odd = dst.optimizers["optimizer"].state[dst.models["model"].weight]["odd"]
    assert type(odd) is Marked and torch.equal(odd, torch.arange(3.0))
