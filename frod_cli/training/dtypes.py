"""The dtypes a run trains in, beside the model's own (frod_cli/precision.py settles model.dtype for the device):
trainables in float32 under a bfloat16/float16 model, gradient checkpointing, the dtype merged/ is written in."""
from __future__ import annotations

from typing import Any, List

import torch

from frod_cli import FrodCliError

LOW = (torch.bfloat16, torch.float16)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def float32_trainables(model: torch.nn.Module, method: Any) -> List[str]:
    """Frozen weights in model.dtype (bfloat16, float16), trainables in float32, so their updates and AdamW's state
    are float32 too. The methods' own trainables already are (FRoD's lambda and S, PEFT's adapter weights); what is
    left are the trained modules (the task head, method.modules_to_save): each computes in float32 (its inputs cast
    up) and hands back the model's dtype, except a task head, whose float32 logits feed the loss. Full fine-tuning
    keeps the weights as loaded. Returns the names of the modules moved to float32."""
    from frod_cli.frod.targets import inside

    if method.trains_everything:
        return []
    owners = [(n, m) for n, m in model.named_modules()
              if any(p.requires_grad and p.dtype in LOW for p in m.parameters(recurse=False))]
    if not owners:
        return []
    model_dtype = next(p.dtype for p in model.parameters() if p.dtype in LOW)
    heads = method.modules_to_save()
    with torch.no_grad():
        for name, module in owners:
            for p in module.parameters(recurse=False):
                p.data = p.data.float()  # the same Parameter: the optimizer already holds it
            for key, b in module._buffers.items():
                if b is not None and b.dtype in LOW:
                    module._buffers[key] = b.float()
            module.register_forward_pre_hook(lambda m, args, kwargs: (_cast(args, torch.float32),
                                                                      _cast(kwargs, torch.float32)), with_kwargs=True)
            if not inside(name, heads):
                module.register_forward_hook(lambda m, args, out: _cast(out, model_dtype))
    return [n for n, _ in owners]


def enable_gradient_checkpointing(model: torch.nn.Module, name: str) -> None:
    base = getattr(model, "get_base_model", lambda: model)()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise FrodCliError(f"model {name} does not support gradient checkpointing")
    # Non-reentrant checkpointing: frozen inputs need no requires_grad trick, and the FRoD layers inside a
    # checkpointed block simply run their forward again.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def model_dtype(model_cfg: Any) -> torch.dtype:
    """model.dtype: merged/ is written in it (trained heads included, which train in float32)."""
    return getattr(torch, str(model_cfg.dtype))
