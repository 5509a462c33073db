"""``load_weights``: one model's state dict from wherever it was saved, for inference.

No TrainState, optimizer or manager needed.  ``source`` may be an asyncckpt root (its
``which`` checkpoint), one checkpoint folder (with a manifest, or a plain DCP folder), a
release folder, or a foreign DCP checkpoint (``foreign.py``: ``dcp.save``'s and DCP's
state_dict API's ``model.<fqn>`` layout, torchtitan's top-level FQNs, a torchtitan root's
newest ``step-<n>``).  Checksums are verified wherever the source records them (a
checkpoint's manifest, a release's card); plain DCP folders have none.  Nothing is
unpickled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .dcp_io import METADATA_NAME, CheckpointReader
from .errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from .foreign import find_foreign, is_own_layout, weight_keys
from .manifest import MANIFEST_NAME, Manifest, select, step_dir_name
from .release import checkpoint_weights, is_release, release_weights
from .restore import _load, check_map_location
from .retention import best_step_for
from .storage import Storage, list_committed, read_folder_manifest

log = logging.getLogger(__name__)


def load_weights(source: str | os.PathLike[str], which: int | str = "latest", *,
                 model_name: str | None = None, map_location: Any = "cpu",
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (``{fqn: tensor}``) of one model saved at ``source``, on ``map_location``.

    ``which`` picks a checkpoint of a root: ``"latest"``, a step number, ``"best"`` (by the
    metric and mode the run's retention recorded in its manifests) or ``"best:<metric>"`` (a
    metric recorded with ``save(metrics=...)``, in its recorded mode, else lowest first), as
    ``restore`` ranks them; it must be ``"latest"`` for any other source.  ``model_name`` picks one model of a checkpoint or release that holds several.
    """
    device = check_map_location(map_location) or torch.device("cpu")
    storage = Storage(os.fspath(source), storage_options)
    single = is_release(storage) or storage.exists(MANIFEST_NAME) or storage.exists(METADATA_NAME)
    if which != "latest" and single:
        raise ConfigError.field("which", which, f'"latest": {storage.url} is a single checkpoint')
    if is_release(storage):
        tensors = _one_model(release_weights(storage, verify=True), model_name, storage.url)
    elif storage.exists(MANIFEST_NAME):
        tensors = checkpoint_weights(storage, read_folder_manifest(storage), model=model_name)
    elif storage.exists(METADATA_NAME):
        tensors = _plain_weights(storage, model_name)
    elif list_committed(storage):
        m = _chosen(storage, which)
        tensors = checkpoint_weights(storage.child(step_dir_name(m.step)), m, model=model_name)
    elif (folder := find_foreign(storage)) is not None and which == "latest":
        tensors = _plain_weights(folder, model_name)
    else:
        raise CheckpointNotFoundError(f"to load weights from ({which!r})", storage.url, ())
    return {k: v.to(device) for k, v in tensors.items()}


def _chosen(storage: Storage, which: int | str) -> Manifest:
    manifests = list_committed(storage)
    if isinstance(which, str) and which.startswith("best"):
        metric = which.partition(":")[2] or None
        found = best_step_for(manifests, metric, None)
        if found is None:
            raise ConfigError.field("which", which, '"best:<metric>": the checkpoints under '
                                    f"{storage.url} record no ranking metric")
        if found[1] is None:
            raise CheckpointNotFoundError(f"with metric {found[0]!r}", storage.url,
                                          [m.step for m in manifests])
        which = found[1]
    return select(manifests, which, storage.url)


def _one_model(tensors: dict[str, torch.Tensor], model_name: str | None,
               source: str) -> dict[str, torch.Tensor]:
    """A release's tensors, or one model's (``"<name>.<key>"`` keys, several models)."""
    if model_name is None:
        return tensors
    prefix = f"{model_name}."
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not out:
        names = sorted({k.split(".", 1)[0] for k in tensors})
        raise ConfigError.field("model_name", model_name, f"one of the models in {source}: {names}")
    return out


def _plain_weights(folder: Storage, model_name: str | None) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP folder without a manifest (no checksums to verify)."""
    saved = CheckpointReader(folder, verify=False).read_metadata().state_dict_metadata
    if is_own_layout(saved):
        return checkpoint_weights(folder, Manifest(step=0), model=model_name, verify=False)
    layout, keys = weight_keys(saved)
    keys = {fqn: k for fqn, k in keys.items() if isinstance(saved[k], TensorStorageMetadata)}
    if not keys:
        tops = sorted({k.split(".", 1)[0] for k in saved})
        raise StateMismatchError(f"{folder.url} holds no model weights asyncckpt can find: it has "
                                 f"top-level entries {tops[:20]}", missing=["model"])
    target = {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype)
              for k in keys.values()}
    _load(target, CheckpointReader(folder, verify=False), folder.url, None)
    log.info("%s: weights read as a foreign DCP checkpoint (layout %s)", folder.url, layout)
    return {fqn: target[k] for fqn, k in keys.items()}
