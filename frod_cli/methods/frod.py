"""`frod`: our FRoD implementation (frod_cli.frod). Groups: sparse (S values), scale (lambda), head."""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from frod_cli.methods.base import Method, register_method


@register_method("frod")
class FrodMethod(Method):
    def frod_config(self, model: nn.Module):
        from frod_cli.frod import FrodConfig

        c = self.cfg
        return FrodConfig(
            target_modules=self.paths_regex(self.resolve_targets(model)),
            sparse_rate=float(c.sparse_rate),
            regularization=float(c.regularization),
            seed=int(c.frod_seed),
            modules_to_save=self.modules_to_save(),
            layers_to_transform=None,  # already applied by resolve_targets
            basis_dtype=c.basis_dtype,
            mode=c.frod_mode,
            store_u=bool(c.store_u),
        )

    def adapt(self, model: nn.Module) -> nn.Module:
        from frod_cli.frod import apply_frod

        self.count_base(model)
        return apply_frod(model, self.frod_config(model))

    def param_groups(self, model: nn.Module) -> Dict[str, List[nn.Parameter]]:
        from frod_cli.frod import param_groups

        return {k: list(v) for k, v in param_groups(model).items() if len(v)}

    def save_adapter(self, model: nn.Module, directory: str) -> None:
        from frod_cli.frod import save_adapter

        save_adapter(model, directory)

    def load_adapter(self, base_model: nn.Module, directory: str) -> nn.Module:
        from frod_cli.frod import load_adapter

        self.count_base(base_model)
        return load_adapter(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        from frod_cli.frod import merge_and_unload

        return merge_and_unload(model)
