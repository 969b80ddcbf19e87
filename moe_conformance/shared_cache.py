"""Compute once per pytest run, across pytest-xdist workers: expensive engine work (vLLM engine
builds) that several checks of one case read.

``get(directory, key, compute)``: the first process to ask for ``key`` takes a lock file in
``directory``, computes and stores the result (``torch.save``); the others wait on the lock and
load it. Results are deterministic, so which worker computes does not matter. ``directory`` is
shared by the run's workers (``run_directory(tmp_path_factory)``) and unique to the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_LOCAL: dict[tuple[str, str], Any] = {}


def run_directory(tmp_path_factory) -> Path:
    """A folder every worker of this pytest run sees (xdist workers' base temps are siblings)."""
    base = Path(tmp_path_factory.getbasetemp())
    root = base.parent if base.name.startswith("popen-gw") else base
    folder = root / "moe-shared"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def get(directory: Path, key: str, compute: Callable[[], Any]) -> Any:
    memo = (str(directory), key)
    if memo in _LOCAL:
        return _LOCAL[memo]
    name = hashlib.sha1(key.encode()).hexdigest()[:20]
    data, lock = Path(directory) / f"{name}.pt", Path(directory) / f"{name}.lock"
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if data.exists():
                value = torch.load(data, weights_only=True)  # tensors and plain containers only
            else:
                value = compute()
                tmp = data.with_suffix(f".tmp{os.getpid()}")
                torch.save(value, tmp)
                os.replace(tmp, data)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    _LOCAL[memo] = value
    return value
