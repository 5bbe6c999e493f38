"""FrodConfig: everything that defines a FRoD adapter (FROD_METHOD.md section 3)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Union

MODES = ("auto", "materialize", "project")
BASIS_DTYPES = ("float32", "float64")
BASIS_BUILDS = ("auto", "memory", "streamed")


class FrodError(ValueError):
    """A refusal the user can act on; its message is one clear line."""


@dataclass
class FrodConfig:
    # Suffixes of module paths ("query" matches "...attention.self.query"), or one regex string
    # matched against the whole path (re.fullmatch), as in PEFT.
    target_modules: Union[List[str], str] = field(default_factory=list)
    # Fraction of the n^2 entries of S that are trainable (off-diagonal, fixed pattern per category).
    sparse_rate: float = 0.01
    # pi in T = (1/N) sum_i (Q_i^T Q_i + pi I)^-1 (the regularized HO-GSVD).
    regularization: float = 1e-3
    # Seeds the sparse pattern; with the same weights and seed the adapter is the same on any machine.
    seed: int = 0
    # Modules (suffixes) trained in full and saved with the adapter, e.g. a task head.
    modules_to_save: List[str] = field(default_factory=list)
    # Restrict to these block indices (the first integer in a module path).
    layers_to_transform: Optional[List[int]] = None
    # Precision of the decomposition; the runtime works in float32 (trainables) and the model's dtype.
    basis_dtype: str = "float32"
    # How dW x is computed: "materialize" builds dW once per forward (one GEMM per token),
    # "project" applies it per token; "auto" picks per layer and call from the shapes (layer.py).
    mode: str = "auto"
    # Keep U_i as a buffer (one extra copy of each adapted weight) instead of recomputing it per step.
    store_u: bool = False
    # How a category's basis is decomposed: "memory" (the whole stack at once: fast, about 5 x the category's
    # float32 size of workspace), "streamed" (one layer block at a time: a few n x n matrices, whatever the number
    # of layers), "auto" (memory where it fits the device's free memory, else streamed). See build.py.
    basis_build: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        if not self.target_modules:
            raise FrodError("FrodConfig.target_modules is empty: name the linear layers to adapt")
        if not isinstance(self.sparse_rate, (int, float)) or not 0.0 <= float(self.sparse_rate) < 1.0:
            raise FrodError(f"sparse_rate must be in [0, 1), got {self.sparse_rate!r}")
        if not isinstance(self.regularization, (int, float)) or not float(self.regularization) > 0.0:
            raise FrodError(f"regularization must be > 0, got {self.regularization!r}")
        if self.mode not in MODES:
            raise FrodError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.basis_build not in BASIS_BUILDS:
            raise FrodError(f"basis_build must be one of {', '.join(BASIS_BUILDS)}, got {self.basis_build!r}")
        if self.basis_dtype not in BASIS_DTYPES:
            raise FrodError(f"basis_dtype must be one of {', '.join(BASIS_DTYPES)}, got {self.basis_dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FrodConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise FrodError(f"unknown FrodConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)
