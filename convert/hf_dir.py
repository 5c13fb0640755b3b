"""A Hugging Face model directory: read lazily after checking it whole, written one tensor at a time.

Reading (`HFDir`) opens `config.json` and the safetensors headers only, and refuses, naming the
file and the tensor, whatever does not match the config before any tensor is read. Only
safetensors are read: a directory with pickled weights (`*.bin`, `*.pt`) only is refused, and no
code from the directory is ever imported (no remote code). Tensors are read with plain reads at
the header's offsets, not through a memory map: mapped pages of every tensor read would count
towards the process's resident memory until the kernel reclaims them (2.9 GB for a 2.5 GB model,
measured by benchmarks/hf_export.py), read ones are freed with the tensor.

Writing (`ShardWriter`) streams a safetensors file: its header is computed from the shapes and
dtypes it is given up front, then each tensor's bytes go to disk as soon as it is produced, so a
shard is never held in memory (the `safetensors` package serialises a whole dict at once).
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import shutil
import struct
from pathlib import Path

import torch

from model.config import ConfigError, ModelConfig
from model.hf_mapping import entries, hf_ignored, empty_shared_experts, model_config_from_hf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files carried along with the weights, both ways (never code: no *.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
GENERATION = "generation_config.json"

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in _TORCH.items()}
_FLOAT = set(_TORCH)


class HFDirError(ValueError):
    """A Hugging Face directory that cannot be converted; the message names file and tensor."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a glm4_moe directory for `cfg` holds -> shape (zero-size shared experts included)."""
    out = {h: s for e in entries(cfg) for h, s in zip(e.hf, e.hf_shapes)}
    out.update(empty_shared_experts(cfg))
    return out


class HFDir:
    """A glm4_moe directory, checked whole on opening; `get(name)` reads one tensor."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise HFDirError(f"{self.dir}: not a directory")
        config = self.dir / "config.json"
        if not config.is_file():
            raise HFDirError(f"{config}: missing (a Hugging Face model directory has one)")
        try:
            self.config = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise HFDirError(f"{config}: not JSON ({e})") from None
        if self.config.get("model_type") != "glm4_moe":
            raise HFDirError(f"{config}: model_type={self.config.get('model_type')!r} "
                             f"(architectures {self.config.get('architectures')}); only glm4_moe converts")
        try:
            self.cfg = model_config_from_hf(self.config, name=self.dir.name)
        except (ConfigError, ValueError) as e:
            raise HFDirError(f"{config}: {e}") from None
        except KeyError as e:
            raise HFDirError(f"{config}: field {e} missing") from None
        self._headers: dict[str, dict] = {}
        self.weight_map = self._weight_map()
        self._check_tensors()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFDirError(f"{index}: not a safetensors index ({e!r})") from None
        elif (self.dir / SINGLE).is_file():
            weight_map = {k: SINGLE for k in self._header(SINGLE)}
        else:
            pickled = sorted(p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
            raise HFDirError(f"{self.dir}: no {INDEX} or {SINGLE}"
                             + (f"; pickled weights ({', '.join(pickled[:3])}) are not read (they can run code): "
                                "save the model with safetensors" if pickled else ""))
        for name in sorted(set(weight_map.values())):
            if not (self.dir / name).is_file():
                raise HFDirError(f"{self.dir / name}: missing ({INDEX} maps "
                                 f"{sum(v == name for v in weight_map.values())} tensors to it)")
        return weight_map

    def _header(self, file: str) -> dict:
        """{name: (dtype, shape, start, end)} of a safetensors file, start/end absolute in the file."""
        if file not in self._headers:
            path = self.dir / file
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
                if not 0 < n <= min(size - 8, 100 * 2**20):
                    raise HFDirError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise HFDirError(f"{path}: unreadable safetensors header ({e})") from None
            out = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if not 0 <= start <= end <= size - 8 - n:
                    raise HFDirError(f"{path}: {name} lies at bytes {start}..{end} of a {size - 8 - n}-byte data "
                                     "section (truncated file?)")
                out[name] = (info["dtype"], tuple(info["shape"]), 8 + n + start, 8 + n + end)
            self._headers[file] = out
        return self._headers[file]

    def _check_tensors(self) -> None:
        """Names, shapes and dtypes of every tensor against the config, from the headers alone."""
        want = expected_shapes(self.cfg)
        ignored = hf_ignored(self.cfg)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.weight_map.values())):
            header = self._header(file)
            for name in sorted(k for k, v in self.weight_map.items() if v == file):
                if name not in header:
                    raise HFDirError(f"{self.dir / file}: has no tensor {name!r} ({INDEX} says it does)")
                dtype, shape, start, end = header[name]
                self.shapes[name] = shape
                if name in want and dtype not in _FLOAT:
                    raise HFDirError(f"{self.dir / file}: {name} has dtype {dtype}, not floating point")
                if dtype in _FLOAT and end - start != math.prod(shape) * _ITEMSIZE[dtype]:
                    raise HFDirError(f"{self.dir / file}: {name} takes {end - start} bytes, but {dtype} "
                                     f"{list(shape)} needs {math.prod(shape) * _ITEMSIZE[dtype]}")
        missing = sorted(set(want) - set(self.shapes) - set(empty_shared_experts(self.cfg)))
        unexpected = sorted(set(self.shapes) - set(want) - ignored)
        if missing or unexpected:
            raise HFDirError(f"{self.dir}: tensors do not match config.json: {len(missing)} missing (first: "
                             f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
        for name, shape in want.items():
            if name in self.shapes and self.shapes[name] != tuple(shape):
                raise HFDirError(f"{self.dir / self.weight_map[name]}: {name} has shape {list(self.shapes[name])}, "
                                 f"config.json gives {list(shape)}")

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        dtype, shape, start, end = self._header(file)[name]
        # straight into a tensor's own memory, which stays resizable (the checkpoint writer releases
        # each tensor once written: pretrain/checkpoint_io.py), unlike memory lent by numpy or bytes
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(self.dir / file, "rb") as f:
            f.seek(start)
            if raw.numel() and f.readinto((ctypes.c_char * raw.numel()).from_address(raw.data_ptr())) != raw.numel():
                raise HFDirError(f"{self.dir / file}: {name} cut short (file truncated while reading?)")
        return raw.view(_TORCH[dtype]).reshape(shape)

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH[self._header(self.weight_map[name])[name][0]]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files and generation_config.json from `src`, where present; returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


class ShardWriter:
    """One safetensors file, written tensor by tensor in the order of `specs` [(name, dtype, shape)]."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path, self.specs, self.next = path, specs, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in specs:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.nbytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors package writes
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, t: torch.Tensor) -> None:
        want, dtype, shape = self.specs[self.next]
        if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise AssertionError(f"{self.path.name}: got {name} {t.dtype} {tuple(t.shape)}, expected {want} "
                                 f"{dtype} {tuple(shape)}")
        if t.numel():
            self.file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise AssertionError(f"{self.path.name}: {len(self.specs) - self.next} tensors never written")
        self.file.close()



def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units, as Hugging Face's max_shard_size), '2GiB' -> 2 * 2**30."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)
