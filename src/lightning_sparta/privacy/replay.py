"""Per-sample gradients of a module's own parameters by replaying its forward pass per sample.

The fallback for modules that own trainable parameters but have no grad sampler (timm's relative
position bias tables, LeViT/EfficientFormer attention biases, a custom layer). For one recorded call
of the module, with inputs ``x`` (every positional and keyword argument) and output gradient ``g``,
the gradient of sample ``i`` with respect to the module's *own* parameters ``θ`` is

    ∂/∂θ ⟨f(θ; x_i), g_i⟩,

computed for all samples at once with ``torch.func.vmap(torch.func.grad(...))`` on a parameter-free
copy of the module. Everything else the forward reads is held constant at its current value: the
parameters of its submodules (which get their own per-sample gradients from their own hooks, so
each parameter is still counted once), its buffers (a relative position index, a frozen
BatchNorm's running statistics) and the inputs without a batch dimension (an attention mask shared
by all samples).

Compared with Opacus' functorch fallback, which re-runs the module's whole subtree for its first
input only and refuses any module that holds a buffer, this keeps the submodules on their fast
paths, replays calls with several inputs or keyword arguments, and accepts buffers, provided the
forward pass does not change them (:func:`buffer_versions` lets the caller check): a layer that
updates statistics of the batch in its forward (BatchNorm that is not frozen, timm's EvoNorm B in
training mode) mixes the samples of a batch and is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def buffer_versions(module: nn.Module) -> dict[str, int]:
    """The version counter of every buffer of ``module`` (its submodules' included), by name."""
    return {name: buffer._version for name, buffer in module.named_buffers()}


def changed_buffers(module: nn.Module, before: dict[str, int]) -> list[str]:
    """Names of the buffers of ``module`` modified in place since ``before`` was taken."""
    now = buffer_versions(module)
    return [name for name, version in before.items() if now.get(name, version) != version]


class OwnParameterReplay:
    """Computes per-sample gradients of ``module``'s own trainable parameters from one recorded call.

    Create it before any hook is added to ``module``: the parameter-free copy it keeps (on the
    ``meta`` device, so it costs no memory) must not carry them.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> x, g = torch.randn(4, 3), torch.randn(4, 2)
        >>> per_sample = OwnParameterReplay(layer)(layer, [x], {}, g)
        >>> torch.allclose(per_sample[layer.weight], g[:, :, None] * x[:, None, :])
        True
    """

    def __init__(self, module: nn.Module, names: list[str] | None = None, label: str = "") -> None:
        """``names``: the own parameters to differentiate (default: every trainable one); ``label``: the
        module's name in the model, for error messages."""
        self.names = names
        self.label = label or type(module).__name__
        # copy the structure only: every tensor of the copy is an empty one on the meta device
        memo: dict[int, Any] = {}
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in module.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        self.stateless = copy.deepcopy(module, memo)

    def __call__(
        self, module: nn.Module, inputs: list[Any], kwargs: dict[str, Any], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        own = {  # `names` may name a child's parameters ("out_proj.weight") that the forward uses functionally
            name: p
            for name, p in module.named_parameters()
            if p.requires_grad and (name in self.names if self.names is not None else "." not in name)
        }
        if not own:
            return {}
        constants = {name: p.detach() for name, p in module.named_parameters() if name not in own}
        constants.update(dict(module.named_buffers()))
        batch = backprops.shape[0]

        def batched(value: Any) -> int | None:  # the inputs with the batch dimension are vmapped, not the others
            return 0 if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch else None

        args, names = tuple(inputs), sorted(kwargs)
        values = tuple(kwargs[n] for n in names)
        arg_dims, value_dims = tuple(batched(a) for a in args), tuple(batched(v) for v in values)
        first = next((p for p in own.values()), None)
        floating = [a for a in (*args, *values) if torch.is_tensor(a) and a.is_floating_point()]
        mixed = first is not None and bool(floating) and floating[0].dtype != first.dtype

        def one(params: dict[str, torch.Tensor], args: tuple, values: tuple, g: torch.Tensor) -> torch.Tensor:
            args = tuple(_one_sample(a, d) for a, d in zip(args, arg_dims, strict=True))
            kw = {n: _one_sample(v, d) for n, v, d in zip(names, values, value_dims, strict=True)}
            # the forward ran under autocast if its inputs are narrower than its parameters (bf16-mixed)
            context = torch.autocast(g.device.type, dtype=floating[0].dtype) if mixed else nullcontext()
            with context:
                out = functional_call(self.stateless, {**constants, **params}, args, kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            return (out * g.unsqueeze(0).to(out.dtype)).sum()

        grads: Callable[..., dict[str, torch.Tensor]] = vmap(grad(one), in_dims=(None, arg_dims, value_dims, 0))
        try:
            per_sample = grads({n: p.detach() for n, p in own.items()}, args, values, backprops)
        except RuntimeError as error:
            if "randomness" not in str(error):
                raise RuntimeError(
                    f"The per-sample replay of `{self.label}` ({type(module).__name__}) failed: its forward pass "
                    f"cannot run one sample at a time under torch.func ({error}). Freeze its parameters "
                    f"{sorted(own)}, or register a grad sampler for {type(module).__name__}."
                ) from error
            raise RuntimeError(
                f"The per-sample replay of `{self.label}` ({type(module).__name__}) met a random operation "
                "(dropout, stochastic depth) in its forward pass. A replay cannot reuse the draws of the real "
                "forward pass, so its per-sample gradients would be wrong: set that module's drop rates to 0, or "
                f"freeze its parameters {sorted(own)}."
            ) from error
        return {own[n]: g for n, g in per_sample.items()}


def _one_sample(value: Any, dim: int | None) -> Any:
    return value.unsqueeze(0) if dim == 0 else value


__all__ = ["OwnParameterReplay", "buffer_versions", "changed_buffers"]
