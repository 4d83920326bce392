"""Streaming safetensors I/O shared by the Qwen3 and official-NEO converters.

Reading: `TensorSource` indexes a Hugging Face directory (`model.safetensors`, or shards + `*.index.json`,
or loose `*.safetensors`), validates every file's header up front (a truncated file is an error naming it)
and reads one tensor at a time (plain reads at the header's offsets), so host memory holds one tensor, not
the model.

Writing: `write_shards` plans shards of at most `max_shard_bytes` from the tensors' shapes and dtypes,
writes each file's header first and then the tensors one by one (produced lazily by a callback), so
exporting never materialises a second copy of the model. Files carry metadata {"format": "pt"}, the form
`transformers` loads; a sharded export also writes `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
             "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file; raises ValueError naming the file if it is malformed or
    shorter than its header says (truncated download / interrupted copy)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated or corrupt safetensors file: tensors end at byte {8 + n + end}, "
                         f"file has {size} bytes; re-download or re-export it")
    return header


class TensorSource:
    """Name -> (file, dtype, shape) over every safetensors file of a directory; `get` reads one tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors files (expected {SINGLE_NAME} or shards "
                                    f"with {INDEX_NAME})")
        self.entries: dict[str, tuple[str, str, tuple]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.data_start: dict[str, int] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} lists {name}, which does not exist in {directory}")
            header = read_header(path)
            with open(path, "rb") as f:
                self.data_start[name] = 8 + struct.unpack("<Q", f.read(8))[0]
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                self.offsets[key] = tuple(info["data_offsets"])
                if key in self.entries:
                    raise ValueError(f"tensor {key!r} appears in both {self.entries[key][0]} and {name}")
                self.entries[key] = (name, info["dtype"], tuple(info["shape"]))
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.entries.get(key, (None,))[0] != name:
                    raise ValueError(f"{index} maps {key!r} to {name}, but that file does not hold it")

    def __contains__(self, key):
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def shape(self, key) -> tuple:
        return self.entries[key][2]

    def dtype(self, key) -> np.dtype:
        file, st, _ = self.entries[key]
        if st not in ST_DTYPES:
            raise ValueError(f"{file}: tensor {key!r} has dtype {st}; expected one of {sorted(ST_DTYPES)}")
        return ST_DTYPES[st]

    def get(self, key) -> np.ndarray:
        """One tensor as a numpy array (its stored dtype), read with plain file I/O into a fresh buffer.

        Not `safe_open`: it memory-maps the file, and the mapped pages it touches stay resident (counted in
        RSS) until the handle closes, which would put a second copy of the model in host memory."""
        file, _, shape = self.entries[key]
        out = np.empty(shape, self.dtype(key))
        start, end = self.offsets[key]
        if end - start != out.nbytes:
            raise ValueError(f"{file}: tensor {key!r} holds {end - start} bytes, its dtype and shape need "
                             f"{out.nbytes}")
        with open(os.path.join(self.directory, file), "rb") as f:
            f.seek(self.data_start[file] + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ValueError(f"{file}: truncated while reading tensor {key!r}")
        return out

    def close(self):
        pass


def plan_shards(specs, max_shard_bytes: int):
    """Split [(name, shape, dtype)] in order into shards of at most max_shard_bytes (a lone tensor larger
    than the limit gets its own shard). Returns a list of lists of specs."""
    shards, current, size = [], [], 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), np.dtype(dtype)))
        size += n
    if current:
        shards.append(current)
    return shards


def _write_file(path, specs, produce, progress=None):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != shape:
                raise ValueError(f"tensor {name!r}: produced shape {arr.shape}, planned {shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
            if progress is not None:
                progress(name)


def write_shards(directory, specs, produce, *, max_shard_bytes: int = 5 * 10 ** 9, progress=None):
    """Write tensors [(name, shape, dtype)] to `directory`; produce(name) -> numpy array, called once per
    tensor in order. One file is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    the index. Returns the list of file names written."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        _write_file(os.path.join(directory, name), shard, produce, progress)
        for key, shape, dtype in shard:
            weight_map[key] = name
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
