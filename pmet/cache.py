"""The pmet cache: where it lives and how its entries are keyed (one recipe for every cache).

Folders under the root: models/ (GGUF conversions), stats/ (C0), templates/, targets/, eval/ (unedited results),
sequential/ (progress of sequential edits). An entry's key is `digest(data)` of everything its content depends
on (a model's fingerprint, requests, config fields, ...), or `files_stamp` of the input files it was read from;
entries are written with fileio.atomic_write, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The pmet cache: `cache_dir`, else $PMET_CACHE_DIR, else ~/.cache/pmet."""
    root = cache_dir or os.environ.get("PMET_CACHE_DIR") or Path.home() / ".cache" / "pmet"
    return Path(root)


def tensor_sha256(t: Any) -> str:
    """SHA-256 of a tensor's raw bytes (exact: any changed bit changes it; the dtype and shape are not part of it)."""
    import torch

    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def digest(data: Any, size: int = 20) -> str:
    """Hex key of JSON-able `data` (dict keys sorted; other objects by str()): equal data, equal key."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def files_stamp(files: Iterable[Path], size: int = 6) -> str:
    """Hex key of files as they are now (resolved path, size, modification time): changes when any file does."""
    stamps = []
    for f in files:
        st = f.stat()
        stamps.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return digest(stamps, size)
