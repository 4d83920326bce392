"""Data sources: official JSON/JSONL annotations, ArrayRecord shards of self-contained records, text corpora.

Every source is random access (`len`, `[i]`), so grain can shuffle, slice per host and checkpoint by
index. Items are records (see encode.py) or, for ArrayRecord, serialized record bytes that
`materialize` decodes inside the parallel map (a corrupt record is a counted skip, not a crash).

Annotation format (official VLMTrainKit): a JSON list or JSONL file of entries with `image` (a path or a
list) or `images`, and `conversations` of {"from": "human"|"gpt", "value": ...}; image paths are relative
to the data root. An entry that is itself a list (the packed-list form) contributes each of its
sub-entries as a record. Text-only entries have `conversations` and no image, or a plain `text` field.
"""
from __future__ import annotations

import json
import os
import struct

from neo_jax.data.skips import BAD_RECORD, MISSING_FILE, Skip

MAGIC = b"NEOR1"


def read_annotation_file(path: str) -> list:
    """Entries of a .json (list) or .jsonl file, in order; a malformed file is an error naming the line."""
    with open(path, "r", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            entries = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e}); fix or remove the line") from None
            return entries
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries, got {type(data).__name__}")
    return data


def image_list(entry: dict) -> list:
    if "image" in entry:
        return entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    return list(entry.get("images") or [])


class AnnotationSource:
    """Records of one annotation file; image paths joined with `root` (or the entry's `data_path`)."""

    def __init__(self, path: str, root: str = "", name: str | None = None):
        self.path, self.root = path, root
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.entries = []  # (id, entry)
        for i, e in enumerate(read_annotation_file(path)):
            if isinstance(e, list):  # packed-list form
                self.entries += [(f"{self.name}:{i}.{j}", sub) for j, sub in enumerate(e)]
            else:
                self.entries.append((f"{self.name}:{i}", e))

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        rid, e = self.entries[int(i)]
        if not isinstance(e, dict):
            return {"id": rid, "conversations": None}
        root = e.get("data_path", self.root) or ""
        record = {"id": str(e["id"]) if "id" in e else rid,
                  "images": [os.path.join(root, p) if isinstance(p, str) else p for p in image_list(e)]}
        for k in ("conversations", "text", "system"):
            if k in e:
                record[k] = e[k]
        return record

    def __repr__(self):
        return f"AnnotationSource({self.path!r}, {len(self)} records)"


def serialize_record(record: dict) -> bytes:
    """A self-contained record: MAGIC, u32 header length, JSON header, then the image bytes.

    Image paths are read now; a missing file raises Skip(missing_file)."""
    blobs = []
    for src in record.get("images") or []:
        if isinstance(src, (bytes, bytearray)):
            blobs.append(bytes(src))
        else:
            if not os.path.isfile(src):
                raise Skip(MISSING_FILE, f"image file {src!r} does not exist")
            with open(src, "rb") as f:
                blobs.append(f.read())
    header = {k: v for k, v in record.items() if k != "images"}
    header["image_sizes"] = [len(b) for b in blobs]
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *blobs])


def deserialize_record(data: bytes, rid: str = "?") -> dict:
    """Inverse of serialize_record; a record that does not decode raises Skip(bad_record)."""
    try:
        if data[: len(MAGIC)] != MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        header = json.loads(data[start: start + n].decode("utf-8"))
        sizes, pos, images = header.pop("image_sizes"), start + n, []
        for s in sizes:
            images.append(data[pos: pos + s])
            pos += s
        if pos != len(data):
            raise ValueError(f"record holds {len(data)} bytes, header says {pos}")
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise Skip(BAD_RECORD, f"stored record {rid} does not decode: {e}") from None
    header["images"] = images
    header.setdefault("id", rid)
    return header


def _glob(epath, pattern: str) -> list[str]:
    """Files matching `pattern` (a glob in the last path component), local or remote."""
    path = epath.Path(pattern)
    if not any(ch in path.name for ch in "*?["):
        return [pattern] if path.exists() else []
    return [str(p) for p in path.parent.glob(path.name)]


class ArrayRecordSource:
    """Serialized records from ArrayRecord shards (files or glob patterns); items are {"id", "bytes"}."""

    def __init__(self, paths):
        import grain
        from etils import epath

        paths = [paths] if isinstance(paths, str) else list(paths)
        files = sorted(f for p in paths for f in (_glob(epath, p) or [p]))  # local or gs:// (etils.epath)
        missing = [f for f in files if not epath.Path(f).is_file()]
        if missing or not files:
            raise FileNotFoundError(f"ArrayRecord shards not found: {missing or paths}; build them with "
                                    f"`neo-jax data build`")
        self.files = files
        self._source = grain.sources.ArrayRecordDataSource(files)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        return {"id": f"arrayrecord:{int(i)}", "bytes": self._source[int(i)]}

    def __repr__(self):
        return f"ArrayRecordSource({len(self.files)} shards, {len(self)} records)"


def materialize(item) -> dict:
    """A record dict from a source item (decodes ArrayRecord bytes)."""
    if "bytes" in item and "conversations" not in item:
        return deserialize_record(item["bytes"], item.get("id", "?"))
    return item


def _write_shard(args):
    """Writes one shard atomically (temp name, then rename); returns (written, {reason: count})."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source_args, indices, out_path = args
    src = AnnotationSource(*source_args)
    tmp = out_path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    written, skipped = 0, {}
    for i in indices:
        try:
            writer.write(serialize_record(src[i]))
            written += 1
        except Skip as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    writer.close()
    os.replace(tmp, out_path)  # a killed build leaves only *.tmp files, never a shard that reads as good
    return written, skipped


def build_shards(annotations: str, root: str, out_dir: str, num_shards: int, num_workers: int = 2,
                 progress: bool = True) -> dict:
    """Converts an annotation file into `num_shards` ArrayRecord shards of self-contained records.

    Records are dealt round-robin to shards; shards are written in parallel processes. Returns
    {"files": [...], "written": n, "skipped": {reason: count}}."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    if num_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {num_shards}")
    src = AnnotationSource(annotations, root)
    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.join(out_dir, f"{src.name}-{k:05d}-of-{num_shards:05d}.array_record")
             for k in range(num_shards)]
    jobs = [((annotations, root, src.name), range(k, len(src), num_shards), files[k]) for k in range(num_shards)]
    written, skipped = 0, {}
    with ProcessPoolExecutor(max_workers=max(1, num_workers)) as pool, \
            tqdm(total=len(src), unit="rec", desc="data build", disable=not progress) as bar:
        for (w, s), job in zip(pool.map(_write_shard, jobs), jobs):
            written += w
            for k, v in s.items():
                skipped[k] = skipped.get(k, 0) + v
            bar.update(len(job[1]))
    return {"files": files, "written": written, "skipped": skipped}
