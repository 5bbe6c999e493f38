"""`full`: full fine-tuning. Groups: head (the task head), backbone (everything else)."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from torch import nn

from frod_cli.methods.base import Method, MethodConfig, register_method, split_head

WEIGHTS = "model.safetensors"


@register_method("full", config=MethodConfig)
class FullMethod(Method):
    trains_everything = True
    refuse_quantized = ("full fine-tuning trains every weight and 4-bit weights cannot be trained; use "
                        "model.quantization=none, or an adapter method (frod, lora, dora, vera)")

    def reference_refusal(self):
        """The starting model is not inside a fully fine-tuned one: it would be a second model in memory."""
        return ("method=full trains every weight, so the starting model (the reference of a KL penalty, task.beta > "
                "0) is not inside the trained one: it would take a second copy of the model in memory (as many "
                "bytes again as its weights), which frod does not keep; use task.beta=0, or an adapter method "
                "(frod, lora, dora, vera, pissa)")

    def adapt(self, model: nn.Module) -> nn.Module:
        self.count_base(model)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def param_groups(self, model: nn.Module) -> Dict[str, List[nn.Parameter]]:
        head, rest = split_head(model, self.modules_to_save())
        return {k: v for k, v in {"backbone": rest, "head": head}.items() if v}

    def save_adapter(self, model: nn.Module, directory: str) -> None:
        # The "adapter" of full fine-tuning is the whole state dict (tied weights stored once).
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        save_model(model, os.path.join(directory, WEIGHTS))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            f.write('{"method": "full"}\n')

    def save_gathered(self, state: Dict[str, Any], directory: str) -> None:
        # the same files from the state gathered off the shards (tied weights are separate tensors there: both
        # names are written, and load_model reads either)
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            f.write('{"method": "full"}\n')

    def load_adapter(self, base_model: nn.Module, directory: str) -> nn.Module:
        from safetensors.torch import load_model

        self.count_base(base_model)
        load_model(base_model, os.path.join(directory, WEIGHTS), strict=True)
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
