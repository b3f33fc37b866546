"""The embedding cache's files: the format of one slice's file and the hashes its keys are made of.

A slice file is ``_MAGIC``, the sha256 of the payload (64 hex digits and a newline), then the
payload: an ``np.savez`` archive of the slice's arrays and a ``meta`` JSON string holding the
file's own key. :func:`encode_entry` makes those bytes, :func:`decode_entry` checks and reads
them back (any mismatch is a :class:`CacheError`). Keys are the sha256 of canonical JSON
(:func:`sha_json`) over content hashes of the input files (:func:`file_sha256`), never over
their paths. :class:`automedsam.data.cache.EmbeddingCache` builds the keys and writes the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..classes import CLASS_IDS, DATASET_LABELS
from .io import content_sha256
from .preprocess import LOW_RES, InputGeometry

__all__ = ["CACHE_FORMAT", "CacheError", "file_sha256", "owner_rank", "sha_json", "label_rules", "atomic_bytes",
           "encode_entry", "decode_entry"]

CACHE_FORMAT = 1  # bump when the file layout or what is stored changes
_MAGIC = b"AUTOMEDSAM-CACHE-1\n"


class CacheError(RuntimeError):
    """A cache entry is missing or corrupt (and could not be recomputed here)."""


_SHA_MEMO: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Content sha256 of a file or folder, memoised on (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    if p.is_dir():
        stamp = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()))
    else:
        stamp = (st.st_size, st.st_mtime_ns)
    memo_key = (str(p.resolve()), stamp)
    if memo_key not in _SHA_MEMO:
        _SHA_MEMO[memo_key] = content_sha256(p)
    return _SHA_MEMO[memo_key]


def owner_rank(key: str, world_size: int) -> int:
    """The rank that computes and writes the cache file of ``key`` (a slice or case key) when
    ``world_size`` processes share a build."""
    return int(key[:15], 16) % max(1, int(world_size))


def sha_json(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): what the keys are made of."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def label_rules(dataset: str) -> dict:
    """The label mapping of a dataset, with the class ids it produces (part of the keys)."""
    rules = DATASET_LABELS[dataset]
    return {name: {"id": CLASS_IDS[name], **rule} for name, rule in rules.items()}


def atomic_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically (see :func:`automedsam.atomic.atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def encode_entry(key: str, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """The bytes of one slice file: header (magic, payload sha256) and the ``np.savez`` payload."""
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps({"key": key, **meta})), **arrays)
    payload = buf.getvalue()
    return _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode_entry(path: Path, key: str) -> dict:
    """The arrays of the slice file ``path`` holding ``key`` (masks unpacked, geometry as
    :class:`~automedsam.data.preprocess.InputGeometry`); raises CacheError if missing or corrupt."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"cache entry {key} not found ({path})") from None
    head = len(_MAGIC) + 65
    if len(data) < head or not data.startswith(_MAGIC):
        raise CacheError(f"corrupt cache entry {path}: bad header")
    digest, payload = data[len(_MAGIC):head - 1].decode("ascii", "replace"), data[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CacheError(f"corrupt cache entry {path}: checksum mismatch")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        meta = json.loads(str(out.pop("meta")))
    except Exception as e:  # noqa: BLE001 - any decoding problem is corruption
        raise CacheError(f"corrupt cache entry {path}: {type(e).__name__}") from e
    if meta.get("key") != key:
        raise CacheError(f"corrupt cache entry {path}: holds key {meta.get('key')}")
    out["meta"] = meta
    out["masks"] = np.unpackbits(out["masks"], axis=-1, count=LOW_RES * LOW_RES).reshape(-1, LOW_RES, LOW_RES) \
        if out["masks"].size else np.zeros((0, LOW_RES, LOW_RES), np.uint8)
    out["geometry"] = InputGeometry.from_array(out["geometry"])
    return out
