"""Where a category's weights come from: the layer sources of the basis build (build.py, basis.streamed_basis).

A source gives the W_i of one category (m_i x n, torch layout, in layer order) one at a time:

    names, shapes, dtypes      per layer: the module name, (m_i, n), the dtype W_i is read in
    device                     where the factors built from it belong (the model's device)
    collective                 True when reading a layer is a collective (a sharded weight gathered with
                               DTensor.full_tensor()): every rank must read the same layers in the same order
    layer(i)                   W_i whole (a view where the weight is held as it is read)
    blocks(i, rows)            W_i's rows in order, at most `rows` at a time (the streamed build's unit)

Three kinds: the model's modules (`ModuleSource`: plain, Conv1D, 4-bit layers dequantized one at a time, sharded
weights gathered one at a time), tensors in memory (`TensorSource`), and a checkpoint's safetensors files read
lazily (`SafetensorsSource`, `checkpoint_sources`: only the rows a block asks for are read, so a process that
builds a category from the files need not hold the model).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import FrodError
from .layer import is_4bit, is_conv1d, weight_dtype, weight_of, weight_shape


class WeightSource:
    """The protocol, with the defaults a source may keep: `blocks` slices `layer(i)`."""

    names: List[str]
    shapes: List[Tuple[int, int]]
    dtypes: List[torch.dtype]
    device: torch.device
    collective: bool = False

    def __len__(self) -> int:
        return len(self.shapes)

    def layer(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self, i: int, rows: int) -> Iterator[torch.Tensor]:
        W = self.layer(i)
        for start in range(0, W.shape[0], rows):
            yield W[start:start + rows]


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameter), recognized without importing torch.distributed's tensor module."""
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


class ModuleSource(WeightSource):
    """The model's own layers: `weight_of` each (a view of a plain or Conv1D weight; a 4-bit layer dequantized,
    a fresh tensor, one layer at a time); a sharded (DTensor) weight gathered whole, one layer at a time."""

    def __init__(self, members: Sequence[Tuple[str, nn.Module]]):
        self.names = [name for name, _ in members]
        self.modules = [module for _, module in members]
        self.shapes = [weight_shape(m) for m in self.modules]
        self.dtypes = [weight_dtype(m) for m in self.modules]
        weight = self.modules[0].weight
        self.collective = is_sharded(weight)
        self.device = weight.to_local().device if self.collective else weight.device

    def layer(self, i: int) -> torch.Tensor:
        W = weight_of(self.modules[i]).detach()
        return W.full_tensor() if is_sharded(W) else W


class TensorSource(WeightSource):
    """Weights already in memory (tests, benchmarks, callers holding the stack)."""

    def __init__(self, weights: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None):
        self.weights = [w.detach() for w in weights]
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.weights))]
        self.shapes = [(int(w.shape[0]), int(w.shape[1])) for w in self.weights]
        self.dtypes = [w.dtype for w in self.weights]
        self.device = self.weights[0].device

    def layer(self, i: int) -> torch.Tensor:
        return self.weights[i]


class SafetensorsSource(WeightSource):
    """W_i read lazily from safetensors files. `entries[i]` = (file, tensor name, transposed): transposed for a
    Conv1D weight stored in x out. Read in `dtypes[i]` (default: as stored), on the CPU (`device` is only where
    the factors go)."""

    def __init__(self, names: Sequence[str], entries: Sequence[Tuple[str, str, bool]],
                 dtypes: Optional[Sequence[torch.dtype]] = None, device="cpu"):
        from safetensors import safe_open

        self.names, self.entries = list(names), list(entries)
        self.shapes, stored = [], []
        for path, key, transposed in self.entries:
            with safe_open(path, framework="pt") as f:
                piece = f.get_slice(key)
                shape, dtype = [int(d) for d in piece.get_shape()], piece.get_dtype()
            if len(shape) != 2:
                raise FrodError(f"{path}: tensor {key} is {len(shape)}-dimensional, not a linear layer's weight")
            self.shapes.append((shape[1], shape[0]) if transposed else (shape[0], shape[1]))
            stored.append(safetensors_dtype(dtype))
        self.dtypes = list(dtypes) if dtypes is not None else stored
        self.device = torch.device(device)

    def layer(self, i: int) -> torch.Tensor:
        from safetensors import safe_open

        path, key, transposed = self.entries[i]
        with safe_open(path, framework="pt") as f:
            W = f.get_tensor(key)
        return (W.T if transposed else W).to(self.dtypes[i])

    def blocks(self, i: int, rows: int) -> Iterator[torch.Tensor]:
        from safetensors import safe_open

        path, key, transposed = self.entries[i]
        with safe_open(path, framework="pt") as f:
            piece = f.get_slice(key)
            for start in range(0, self.shapes[i][0], rows):
                stop = min(start + rows, self.shapes[i][0])
                block = piece[:, start:stop].T if transposed else piece[start:stop]
                yield block.to(self.dtypes[i])


def safetensors_dtype(name: str) -> torch.dtype:
    """torch's dtype of a safetensors dtype name ("F32", "BF16", ...)."""
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if name not in table:
        raise FrodError(f"a safetensors weight of dtype {name} cannot be decomposed (floating point only)")
    return table[name]


def checkpoint_index(directory) -> Dict[str, str]:
    """Tensor name -> file of a checkpoint directory (model.safetensors, or the shards its index names)."""
    root = Path(os.path.expanduser(str(directory)))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(root / file) for name, file in weight_map.items()}
    single = root / "model.safetensors"
    if not single.is_file():
        raise FrodError(f"{root} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: str(single) for name in f.keys()}


def checkpoint_tensor(index: Dict[str, str], module_name: str) -> str:
    """The checkpoint's name of a module's weight: `<name>.weight`, or the one name that ends with it (the
    checkpoint has a prefix the model lacks, e.g. a head model's file under a base model), or the name with the
    model's own leading parts dropped (the model has a prefix the checkpoint lacks)."""
    wanted = f"{module_name}.weight"
    if wanted in index:
        return wanted
    ending = [k for k in index if k.endswith("." + wanted)]
    if len(ending) == 1:
        return ending[0]
    parts = module_name.split(".")
    for cut in range(1, len(parts)):
        shorter = ".".join(parts[cut:]) + ".weight"
        if shorter in index:
            return shorter
    raise FrodError(f"the checkpoint has no weight for layer {module_name!r}"
                    + (f" (several match: {ending[:3]})" if ending else ""))


def checkpoint_sources(groups: Dict[str, List[Tuple[str, nn.Module]]], directory) -> Dict[str, SafetensorsSource]:
    """One SafetensorsSource per category, reading the layers from the checkpoint in `directory`, in the dtype
    of the model's weights (so its bytes, and the cache key, are the module source's when the model was loaded
    from these files). The model may sit on the meta device (nothing loaded): its factors then go to the CPU.
    A 4-bit layer is refused: the file holds W, the adapter is defined on dequant(W_q)."""
    index = checkpoint_index(directory)
    sources = {}
    for key, members in groups.items():
        entries, dtypes = [], []
        for name, module in members:
            if is_4bit(module):
                raise FrodError(f"{name} is a 4-bit layer: its basis is built on the dequantized weight the model "
                                "holds, not on the checkpoint's; build it from the model (no weights_from)")
            tensor = checkpoint_tensor(index, name)
            entries.append((index[tensor], tensor, is_conv1d(module)))
            dtypes.append(weight_dtype(module))
        home = members[0][1].weight.device
        source = SafetensorsSource([n for n, _ in members], entries, dtypes,
                                   device="cpu" if home.type == "meta" else home)
        for (name, module), shape in zip(members, source.shapes):
            if shape != weight_shape(module):
                raise FrodError(f"the checkpoint's {name} is {shape[0]} x {shape[1]}, the model's "
                                f"{weight_shape(module)[0]} x {weight_shape(module)[1]}: another model")
        sources[key] = source
    return sources
