"""DCP planners that keep object blobs opaque and never unpickle them.

``SavePlanner`` writes ``io.BytesIO`` values (the blobs ``state.py`` made at
save time) as they are, instead of pickling them a second time; a plain DCP
reader still gets the object back, because each blob is a ``torch.save``
stream.  ``SafeLoadPlanner`` reads every object item with ``weights_only=True``, so
a crafted pickle raises ``UnsafeCheckpointError`` and runs nothing.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

from .errors import CorruptCheckpointError, UnsafeCheckpointError

try:
    from torch.distributed.checkpoint._nested_dict import set_element
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint._traverse import set_element  # type: ignore[no-redef]


class SavePlanner(DefaultSavePlanner):
    """DCP's default planner, with pre-serialised blobs passed through."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002
        if write_item.type == WriteItemType.BYTE_IO and isinstance(object, io.BytesIO):
            object.seek(0)
            return object
        return super().transform_object(write_item, object)


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
        obj = safe_load(value, f"{self.source} (item {fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
