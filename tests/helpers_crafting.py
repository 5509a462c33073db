"""Crafting damaged or hostile checkpoints in tests: replace a file or an item and reseal the
manifest (sizes, checksums and its own checksum), so only the reader under test stands in the way."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

from torch.distributed.checkpoint.metadata import MetadataIndex

from asyncckpt.codec import CodecOptions, checksum_bytes, decode_bytes, encode_bytes
from asyncckpt.dcp_io import METADATA_NAME, load_metadata
from asyncckpt.manifest import MANIFEST_NAME, seal


def rewrite_file(folder: Path, name: str, data: bytes) -> None:
    """Replace one file and make the manifest agree with it (size and checksum)."""
    (folder / name).write_bytes(data)
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    (entry,) = [f for f in manifest["files"] if f["path"] == name]
    entry.update(size=len(data), checksum=checksum_bytes(data))
    manifest_path.write_text(json.dumps(seal(manifest), indent=1))


def replace_item(folder: Path, fqn: str, blob: bytes) -> str:
    """Put ``blob`` in place of object item ``fqn`` (encoded as the shard's codec says, the shard
    re-laid out, everything resealed); returns the shard's name."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    path = md.storage_data[MetadataIndex(fqn)].relative_path
    codec = next(f["codec"] for f in manifest["files"] if f["path"] == path)
    stored = encode_bytes(blob, itemsize=1, options=CodecOptions()) if codec else blob
    if codec:  # the shard's recorded decoded size follows the new item, as a writer would
        info = md.storage_data[MetadataIndex(fqn)]
        old = (folder / path).read_bytes()[info.offset:info.offset + info.length]
        grow = len(blob) - len(decode_bytes(old))
        entry = next(f for f in manifest["files"] if f["path"] == path)
        entry["raw_bytes"] += grow
        (folder / MANIFEST_NAME).write_text(json.dumps(seal(manifest), indent=1))
    return replace_stored(folder, MetadataIndex(fqn), stored)


def replace_stored(folder: Path, index: MetadataIndex, stored: bytes) -> str:
    """Put the bytes ``stored`` in place of the item (or tensor chunk) at ``index`` as they are,
    re-lay out its shard and reseal ``.metadata`` and the manifest; returns the shard's name."""
    md = load_metadata((folder / METADATA_NAME).read_bytes(), METADATA_NAME)
    info = md.storage_data[index]
    shard = (folder / info.relative_path).read_bytes()
    delta = len(stored) - info.length
    for k, v in md.storage_data.items():
        if v.relative_path == info.relative_path and v.offset > info.offset:
            md.storage_data[k] = dataclasses.replace(v, offset=v.offset + delta)
    md.storage_data[index] = dataclasses.replace(info, length=len(stored))
    rewrite_file(folder, info.relative_path,
                 shard[:info.offset] + stored + shard[info.offset + info.length:])
    rewrite_file(folder, METADATA_NAME, pickle.dumps(md))
    return info.relative_path
