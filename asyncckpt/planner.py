"""DCP save planning: a cached plan, de-duplicated and balanced, then safe loading.

Plan-then-stage.  ``PlanCache.plan(state_dict)`` runs on the training thread
before anything is copied: every rank builds DCP's local save plan from the
live state (no data is touched, only names, shapes and layouts), the ranks
exchange their plans over a CPU group, and each one computes the same global
plan.  Items that several ranks hold (DDP's replicated parameters and
optimizer state, global blobs such as the scheduler) are kept by exactly one
of them: the largest first, each to the holder that has the fewest bytes so
far, so every rank writes a similar share.  ``plan`` returns this rank's
items only, and only those are staged.

The plan is cached: while no rank's local plan changes (same keys, shapes,
dtypes and shard layout), a save costs one tiny exchange of "changed?" flags
and no re-planning.

``PlannedSavePlanner`` replays the cached plan inside ``dcp.save`` on the
writer thread, so the files written and the ``.metadata`` are exactly those
DCP's own planner would produce for the whole state.  ``SavePlanner`` writes
``io.BytesIO`` values (the blobs ``state.py`` made at save time) as they are,
instead of pickling them a second time; a plain DCP reader still gets the
object back, because each blob is a ``torch.save`` stream.
``SafeLoadPlanner`` reads every object item with ``weights_only=True``, so a
crafted pickle raises ``UnsafeCheckpointError`` and runs nothing.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.utils import find_state_dict_object

from ._torch_compat import flatten_state_dict, global_plan_problems, set_element
from .errors import CorruptCheckpointError, SaveError, UnsafeCheckpointError


log = logging.getLogger(__name__)

Exchange = Callable[[Any], list[Any]]
"""All-gather of one picklable value per rank, in rank order (``[value]`` on one process)."""


def item_key(index: MetadataIndex) -> str:
    """A rank-local key for one write item: its FQN, plus the chunk offset when not at the origin."""
    if index.offset is None or not any(index.offset):
        return index.fqn
    return f"{index.fqn}@{','.join(map(str, index.offset))}"


def item_bytes(item: WriteItem) -> int:
    """Bytes of this item's own chunk (DCP's ``tensor_storage_size`` counts the whole tensor)."""
    td = item.tensor_data
    if td is None or td.chunk is None:
        return 0
    n = 1
    for d in td.chunk.sizes:
        n *= d
    return n * td.properties.dtype.itemsize


def balance_plans(all_plans: list[SavePlan]) -> list[SavePlan]:
    """Keep each item on exactly one of the ranks that hold it, balancing bytes.

    Items only one rank holds stay there.  Shared items go largest first to
    the holder with the fewest bytes so far (ties: the lower rank).  Pure and
    deterministic, so every rank computes the same answer.
    """
    holders: dict[MetadataIndex, list[int]] = {}
    size: dict[MetadataIndex, int] = {}
    for r, plan in enumerate(all_plans):
        for it in plan.items:
            holders.setdefault(it.index, []).append(r)
            size[it.index] = item_bytes(it)
    load = [0] * len(all_plans)
    owner: dict[MetadataIndex, int] = {}
    for idx, ranks in holders.items():
        if len(ranks) == 1:
            owner[idx] = ranks[0]
            load[ranks[0]] += size[idx]
    shared = sorted((i for i, rs in holders.items() if len(rs) > 1), key=lambda i: -size[i])
    for idx in shared:
        r = min(holders[idx], key=lambda x: (load[x], x))
        owner[idx] = r
        load[r] += size[idx]
    return [dataclasses.replace(p, items=[it for it in p.items if owner[it.index] == r])
            for r, p in enumerate(all_plans)]


@dataclass(frozen=True)
class RankPlan:
    """The global save plan, seen from one rank."""

    rank: int
    global_plans: tuple[SavePlan, ...]
    """Every rank's final items, in rank order (before the storage writer's file prefixes)."""
    metadata: Metadata
    """DCP metadata of the whole checkpoint (without storage locations)."""

    @property
    def items(self) -> list[WriteItem]:
        """The items this rank writes."""
        return list(self.global_plans[self.rank].items)

    @property
    def planned_bytes(self) -> list[int]:
        """Tensor bytes each rank writes (object blobs not counted)."""
        return [sum(item_bytes(it) for it in p.items) for p in self.global_plans]

    def select(self, flat: Mapping[str, Any], *, tensors_only: bool = False) -> dict[str, Any]:
        """This rank's items from a flat state dict: local shards, tensors and blobs."""
        return {item_key(it.index): find_state_dict_object(flat, it.index) for it in self.items
                if not (tensors_only and it.type == WriteItemType.BYTE_IO)}


def _global_plan(all_plans: list[SavePlan], rank: int) -> RankPlan:
    plans, metadata = create_default_global_save_plan(balance_plans(all_plans))
    mappings = dict(ChainMap(*[p.planner_data for p in plans if p.planner_data]))
    metadata = dataclasses.replace(metadata, planner_data=mappings)
    problems = global_plan_problems(plans, metadata)
    if problems:
        raise ValueError(f"invalid global save plan: {'; '.join(problems)[:500]}")
    return RankPlan(rank, tuple(plans), metadata)


def _same_plan(a: SavePlan, b: SavePlan) -> bool:
    return a.items == b.items and a.planner_data == b.planner_data


class PlanCache:
    """Plans saves (a collective over ``exchange``) and caches the plan across saves."""

    def __init__(self, exchange: Exchange, *, rank: int = 0, world_size: int = 1) -> None:
        self.exchange = exchange
        self.rank = rank
        self.world_size = world_size
        self.replans = 0
        """How many times the global plan was computed (a warm cache stops counting up)."""
        self._local: SavePlan | None = None
        self._plan: RankPlan | None = None

    def _local_plan(self, state_dict: Mapping[str, Any]) -> tuple[SavePlan, dict[str, Any]]:
        flat, mappings = flatten_state_dict(dict(state_dict))
        plan = create_default_local_save_plan(flat, self.rank == 0)
        return dataclasses.replace(plan, planner_data=mappings), flat

    def plan(self, collect: Callable[[], Mapping[str, Any]], *,
             step: int) -> tuple[RankPlan, dict[str, Any]]:
        """This rank's plan and the items to stage from ``collect()`` (the live state dict).

        Every rank must call it: it exchanges plans.  If collecting or planning
        fails on any rank, every rank raises (that rank its own error, the others
        ``SaveError``), so none waits for the others forever.
        """
        local: SavePlan | None = None
        error: Exception | None = None
        current = self._plan  # read once: another thread's save may be replanning meanwhile
        try:
            local, flat = self._local_plan(collect())
            changed = current is None or self._local is None or not _same_plan(local, self._local)
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of it, not hang
            error, changed = e, True
            if self.world_size > 1:
                log.error("step=%d rank=%d: preparing the save failed: %s", step, self.rank, e)
        said = None if error is None else f"{type(error).__name__}: {error}"
        votes = self.exchange((changed, said))
        failures = {r: err for r, (_, err) in enumerate(votes) if err}
        if error is not None:
            raise error
        if failures:
            raise SaveError(step, failures)
        if any(c for c, _ in votes):
            current = self._replan(local, step)
        assert current is not None
        return current, current.select(flat)

    def _replan(self, local: SavePlan | None, step: int) -> RankPlan:
        all_plans = self.exchange(local)
        self._plan, self._local = None, None
        try:
            plan = _global_plan(all_plans, self.rank)  # the same computation on every rank
        except ValueError as e:
            raise SaveError(step, {self.rank: e}) from e
        self._plan, self._local = plan, local
        self.replans += 1
        log.info("step=%d rank=%d: save plan computed; bytes per rank %s", step, self.rank,
                 plan.planned_bytes)
        return plan

    def cached_selection(self, tensors: Mapping[str, Any]) -> dict[str, Any] | None:
        """This rank's tensors under the cached plan, without any exchange; None if unknown.

        On one process every item is this rank's, so no cache is needed.
        """
        try:
            local, flat = self._local_plan(tensors)
            if self.world_size == 1:
                return {item_key(it.index): find_state_dict_object(flat, it.index)
                        for it in local.items if it.type != WriteItemType.BYTE_IO}
            if self._plan is None:
                return None
            return self._plan.select(flat, tensors_only=True)
        except (KeyError, ValueError):
            return None


class SavePlanner(DefaultSavePlanner):
    """DCP's default planner, with pre-serialised blobs passed through."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002
        if write_item.type == WriteItemType.BYTE_IO and isinstance(object, io.BytesIO):
            object.seek(0)
            return object
        return super().transform_object(write_item, object)


class PlannedSavePlanner(SavePlanner):
    """Replays a ``RankPlan`` inside ``dcp.save``; the state dict holds only this rank's items.

    ``dcp.save`` still runs its gather/scatter over the writer's group, but
    carries empty local plans: the coordinator hands back the cached global plan.
    """

    def __init__(self, plan: RankPlan) -> None:
        super().__init__()
        self.rank_plan = plan

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: Any = None,
                       is_coordinator: bool = False) -> None:
        self.state_dict = dict(state_dict)
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan([])
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if len(all_plans) != len(self.rank_plan.global_plans):
            raise ValueError(f"the save plan is for {len(self.rank_plan.global_plans)} ranks, "
                             f"the writer group has {len(all_plans)}")
        self.global_plan = list(self.rank_plan.global_plans)
        self.metadata = dataclasses.replace(self.rank_plan.metadata)
        return self.global_plan, self.metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self.state_dict[item_key(index)]


def safe_load(data: io.BytesIO | bytes, name: str) -> Any:
    """Deserialise an object item with ``weights_only=True``; code is never run."""
    buf = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    buf.seek(0)
    try:
        return torch.load(buf, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(name, "weights-only data", "a pickle that imports code",
                                    str(e).splitlines()[0]) from e
    except Exception as e:  # noqa: BLE001 - any other failure is a corrupt item
        raise CorruptCheckpointError(name, "a torch.save object", "unreadable item", str(e)) from e


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that objects load with ``weights_only=True``."""

    def __init__(self, source: str = "<checkpoint>", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = safe_load(value, f"{self._file_of(read_item)} (item {fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def _file_of(self, read_item: ReadItem) -> str:
        """The URL of the file holding ``read_item`` (the folder's when unknown), for errors."""
        storage = getattr(getattr(self, "metadata", None), "storage_data", None) or {}
        path = getattr(storage.get(read_item.storage_index), "relative_path", None)
        return f"{self.source.rstrip('/')}/{path}" if isinstance(path, str) else self.source
