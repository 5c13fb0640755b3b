"""A Megatron dist checkpoint's tensors, read and written one at a time by one process.

The checkpoints `pretrain/checkpoint.py` saves are Megatron's `torch_dist` format: PyTorch DCP
files (`*.distcp`) plus a `.metadata` index that gives every tensor's global (whole-model) shape
and the chunks each rank wrote. So a tensor can be assembled from its chunks, whatever tensor,
expert or pipeline layout wrote them, without a process group and without reading anything else:
`TensorReader.read`. `write_tensors` writes the other way: whole tensors (or one chunk per routed
expert), each produced only when its turn to be written comes, which Megatron then loads under any
layout (DCP reads the overlap of each rank's piece with the chunks on disk).

Peak memory of either direction is one tensor plus the chunks being copied (two at most kept: a
rank's piece of a tensor), never the model.
`.metadata` is a pickle; it is read with an unpickler that only builds DCP's own metadata classes,
so a checkpoint directory cannot run code. Chunks are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

# Megatron's marker file for the backend of a dist checkpoint directory.
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked; the message names file and tensor."""


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank (ENOSPC, EIO, ...), raised on every rank together; `latest`
    still names the previous checkpoint and the partial directory is gone."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses (and Megatron's additions to them), torch sizes and
    dtypes, nothing else."""

    _MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
    _NAMES = {("torch", "Size"), ("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
              ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # a writer's checkpoint_id

    def find_class(self, module: str, name: str):
        if (module.startswith(self._MODULES) or (module, name) in self._NAMES
                or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                   torch.memory_format)))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a checkpoint's metadata")


def read_metadata(ckpt: Path) -> Metadata:
    path = ckpt / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no .metadata (not a complete dist checkpoint)")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None


def damaged_files(ckpt: Path) -> list[str]:
    """The data files of a dist checkpoint that are missing or shorter than its metadata says they
    are ('__0_0.distcp: 1,024 of 2,048 bytes'), for naming what a failed load tripped on; the
    metadata itself when it cannot be read. Empty when every file is whole."""
    try:
        metadata = read_metadata(Path(ckpt))
    except CheckpointError as e:
        return [str(e)]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    out = []
    for name, size in sorted(needed.items()):
        path = Path(ckpt) / name
        if not path.is_file():
            out.append(f"{name}: missing")
        elif path.stat().st_size < size:
            out.append(f"{name}: {path.stat().st_size:,} of {size:,} bytes")
    return out


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a file of their own: torch.load reads a
    chunk's records straight into their tensors, with no copy of the whole chunk in between."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + pos
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got


class TensorReader:
    """The tensors of one dist checkpoint directory, read one by one (and only when asked)."""

    def __init__(self, ckpt: str | Path):
        self.dir = Path(ckpt)
        marker = self.dir / "metadata.json"
        if not marker.is_file():
            raise CheckpointError(f"{self.dir}: no metadata.json (not a Megatron dist checkpoint)")
        backend = json.loads(marker.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise CheckpointError(f"{marker}: sharded_backend={backend!r}; only torch_dist checkpoints are read")
        self.metadata = read_metadata(self.dir)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self._check_files()
        self._cache: OrderedDict = OrderedDict()  # storage index -> the chunk as saved, newest last

    def _chunk(self, index) -> torch.Tensor:
        """One saved chunk, whole. The last two are kept: a layer's experts are read one at a
        time, alternating between its fc1 and fc2 tensors, and a rank that saved several experts
        as one chunk would otherwise have that chunk read again for each of them."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        info = self.metadata.storage_data[index]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{self.dir / info.relative_path}: chunk {index.fqn} is stored with "
                                  f"{info.transform_descriptors} (a DCP extension this reader does not apply)")
        with open(self.dir / info.relative_path, "rb") as f:
            chunk = torch.load(_Slice(f, info.offset, info.length), map_location="cpu", weights_only=True)
        self._cache[index] = chunk
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return chunk

    def _check_files(self) -> None:
        """Every data file the index points into exists and is long enough."""
        ends: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the checkpoint's .metadata points into it)")
            if path.stat().st_size < end:
                raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, but the checkpoint's .metadata "
                                      f"reads up to byte {end:,} (truncated)")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor `key` whole, or its slice `index` along the first dimension (one routed expert
        of a layer's stacked experts), in the dtype it was saved in. Read-only: it may be a view of
        a chunk this reader keeps."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.dir}: no tensor {key!r}")
        md = self.tensors[key]
        size = tuple(md.size)
        offsets = (0,) * len(size) if index is None else (index,) + (0,) * (len(size) - 1)
        sizes = size if index is None else (1, *size[1:])
        items = create_read_items_for_chunk_list(key, md, [ChunkStorageMetadata(torch.Size(offsets),
                                                                                torch.Size(sizes))])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != math.prod(sizes):
            raise CheckpointError(f"{self.dir}: tensor {key!r}{'' if index is None else f'[{index}]'}: its chunks "
                                  f"cover {covered:,} of {math.prod(sizes):,} elements (a rank's piece is missing)")
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        for item in items:
            piece = self._chunk(item.storage_index)
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                piece = piece.narrow(dim, start, length)
            if len(items) == 1:  # one chunk holds all of it (a rank held it whole): no copy
                return piece if index is None else piece[0]
            target = dest
            for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                target = target.narrow(dim, start, length)
            target.copy_(piece)
        return dest if index is None else dest[0]


@dataclass
class Chunk:
    """One piece of a tensor to write: its offsets and sizes in the global tensor, and a function
    that produces it (called once, when its turn comes)."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    make: Callable[[], torch.Tensor]


@dataclass
class Pending:
    key: str
    shape: tuple[int, ...]  # global
    dtype: torch.dtype
    chunks: list[Chunk]


class _LazySavePlanner(DefaultSavePlanner):
    """A save plan made from `Pending` tensors instead of a state dict of materialised ones."""

    def __init__(self, tensors: list[Pending], done: Callable[[torch.Tensor], None]):
        super().__init__(flatten_state_dict=False)
        self.items, self.makers = [], {}
        for p in tensors:
            for c in p.chunks:
                index = MetadataIndex(p.key, torch.Size(c.offsets))
                self.items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=p.dtype), size=torch.Size(p.shape))))
                self.makers[index] = (c, p)
        self.done = done
        self.last: torch.Tensor | None = None

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        # FileSystemWriter asks for the next chunk once the last one is in the file; it also keeps
        # every chunk it wrote in a dict until the file is closed (for its safetensors format, not
        # used here): that would hold the whole model. So the last chunk's memory is released here.
        if self.last is not None:
            self.last.untyped_storage().resize_(0)
        chunk, p = self.makers[write_item.index]
        t = chunk.make()
        if tuple(t.shape) != tuple(chunk.sizes):
            raise CheckpointError(f"{p.key} at {chunk.offsets}: produced {tuple(t.shape)}, expected {chunk.sizes}")
        t = t.to(p.dtype).contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() != t.nbytes or not storage.resizable():  # a view, or memory lent by numpy
            t = t.clone()
        self.done(t)
        self.last = t
        return t


def write_tensors(ckpt: str | Path, tensors: list[Pending], common: dict,
                  done: Callable[[torch.Tensor], None] = lambda t: None) -> None:
    """Write a dist checkpoint of `tensors` (and Megatron's common state `common`) into the
    directory `ckpt`, one chunk in memory at a time; `done(t)` after each chunk is produced."""
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    from torch.distributed.checkpoint import state_dict_saver

    writer = FileSystemWriter(str(ckpt), single_file_per_rank=True, thread_count=1, sync_files=False)
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        state_dict_saver.save({}, storage_writer=writer, planner=_LazySavePlanner(tensors, done), no_dist=True)
    torch.save(common, ckpt / "common.pt")
    (ckpt / "metadata.json").write_text(json.dumps(BACKEND))
