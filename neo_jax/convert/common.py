"""Helpers shared by the converters: atomic output directories and per-tensor device placement."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax
import numpy as np


@contextlib.contextmanager
def atomic_dir(out: str, *, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it is renamed to `out`, on any error it is
    removed, so a failed conversion leaves nothing at `out`. An existing non-empty `out` is refused unless
    `overwrite`."""
    if "://" in str(out):
        raise ValueError(f"{out}: converters write to a local directory (atomic rename); copy the result to "
                         f"Cloud Storage afterwards, e.g. gcloud storage cp -r")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"output {out} already exists and is not empty; choose another path or pass "
                              f"overwrite=True (--overwrite)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


def place(host: np.ndarray, sharding=None):
    """A host array as a jax.Array: on the default device, or laid out by `sharding` with each device
    receiving only its slice (no full replica is built per device)."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def tree_get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def tree_set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def leaf_paths(tree, prefix=()):
    """[(path tuple, leaf)] of a nested dict, in sorted key order."""
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    out = []
    for k in sorted(tree):
        out += leaf_paths(tree[k], prefix + (k,))
    return out


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for _, x in leaf_paths(tree))
