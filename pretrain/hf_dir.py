"""A Hugging Face model directory: read lazily after checking it whole, written one tensor at a time.

Reading (`HFDir`) opens `config.json` and the safetensors headers only, and refuses, naming the
file and the tensor, whatever does not match the config before any tensor is read. Only
safetensors are read: a directory with pickled weights (`*.bin`, `*.pt`) only is refused, and no
code from the directory is ever imported (no remote code).

Writing (`ShardWriter`) streams a safetensors file: its header is computed from the shapes and
dtypes it is given up front, then each tensor's bytes go to disk as soon as it is produced, so a
shard is never held in memory (the `safetensors` package serialises a whole dict at once).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import ConfigError, ModelConfig
from model.hf_mapping import entries, hf_ignored, empty_shared_experts, model_config_from_hf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files carried along with the weights, both ways (never code: no *.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
GENERATION = "generation_config.json"

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_FLOAT = {"F32", "BF16", "F16", "F64"}


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
        self.weight_map = self._weight_map()
        self._files: dict[str, object] = {}
        self._check_tensors()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFDirError(f"{index}: not a safetensors index ({e!r})") from None
        elif (self.dir / SINGLE).is_file():
            with safe_open(str(self.dir / SINGLE), "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
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

    def _handle(self, file: str):
        if file not in self._files:
            try:
                self._files[file] = safe_open(str(self.dir / file), "pt")
            except Exception as e:  # the package raises its own error types for a bad header
                raise HFDirError(f"{self.dir / file}: not a readable safetensors file ({e})") from None
        return self._files[file]

    def _check_tensors(self) -> None:
        """Names, shapes and dtypes of every tensor against the config, from the headers alone."""
        want = expected_shapes(self.cfg)
        ignored = hf_ignored(self.cfg)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.weight_map.values())):
            f = self._handle(file)
            names = set(f.keys())
            for name in sorted(k for k, v in self.weight_map.items() if v == file):
                if name not in names:
                    raise HFDirError(f"{self.dir / file}: has no tensor {name!r} ({INDEX} says it does)")
                sl = f.get_slice(name)
                self.shapes[name] = tuple(sl.get_shape())
                if name in want and sl.get_dtype() not in _FLOAT:
                    raise HFDirError(f"{self.dir / file}: {name} has dtype {sl.get_dtype()}, not floating point")
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
        return self._handle(self.weight_map[name]).get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        st = self._handle(self.weight_map[name]).get_slice(name).get_dtype()
        return {v: k for k, v in _ST_DTYPES.items()}[st]

    def close(self) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()


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
            n = _numel(shape) * dtype.itemsize
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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units, as Hugging Face's max_shard_size), '2GiB' -> 2 * 2**30."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)
