"""TrainState: where a run stands. It is what checkpoints/step-N/state.json holds, and nothing else is
needed (with the tensors beside it) to continue the run exactly where it stopped."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps taken in this epoch (its data order is seeded by epoch)
    best: Optional[float] = None  # the best validation objective so far
    best_step: int = 0
    best_val: Dict[str, float] = field(default_factory=dict)  # every validation metric at best_step
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    last_eval_step: int = -1
    window_loss: List[float] = field(default_factory=lambda: [0.0, 0.0])  # loss sum, count since the last log
    jsonl_bytes: int = 0  # size of metrics.jsonl at the checkpoint: later lines are dropped on resume
    num_processes: int = 1
    total_steps: int = 0
    stream: Dict[str, Any] = field(default_factory=dict)  # task.streaming: {epoch, position, counts} (training/streaming.py)

    def improves(self, value: float, mode: str) -> bool:
        if self.best is None:
            return True
        return value > self.best if mode == "max" else value < self.best

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainState":
        known = {f.name for f in fields(cls)}
        st = cls(**{k: v for k, v in d.items() if k in known})
        st.best_val = dict(st.best_val)
        st.window_loss = [float(x) for x in st.window_loss]
        return st
