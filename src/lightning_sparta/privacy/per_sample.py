"""Per-sample gradients through module hooks, without wrapping the model.

:class:`PerSampleGradients` attaches a forward hook (to keep each layer's input) and a full backward
hook (to receive the gradient of its output) to every module that *directly* owns trainable
parameters, and computes ``p.grad_sample`` of shape ``[batch, *p.shape]`` with the grad sampler that
Opacus has registered for the module's exact type (our sparse layers and timm's layers register
theirs in :mod:`lightning_sparta.sparse.grad_samplers`). Three paths exist, and
:meth:`PerSampleGradients.paths` reports which one every module takes:

``"grad_sampler"``
    a registered closed-form sampler (Linear, Conv, norms, Embedding, our row-sparse layers...).
``"broadcast"``
    parameters with a leading batch-broadcast dimension of size 1 that a model owns directly and
    adds to every sample, such as ViT's ``cls_token``/``pos_embed``. They are declared per model type
    with :func:`register_broadcast_parameters`; during the forward pass each is expanded to the batch
    size, so the gradient of the expanded tensor *is* the per-sample gradient. Without this, Opacus
    treats the whole ViT as one unsupported module and runs it through functorch.
``"functorch"``
    any other module: Opacus' functorch fallback (a vmapped re-run of that module), slow but exact.
    It covers the module's whole subtree, so its descendants get no hooks of their own.
``"unsupported"``
    parameters owned directly by a LightningModule: they are typically used in ``training_step``,
    outside any forward pass, so no hook can see them. They get no per-sample gradient; the
    strategy refuses them on the first step if they receive a gradient.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from torch import nn
from torch.utils.hooks import RemovableHandle

Path = Literal["grad_sampler", "broadcast", "functorch", "unsupported"]

_BROADCAST_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def register_broadcast_parameters(module_type: type[nn.Module], names: Iterable[str]) -> None:
    """Declare parameters of ``module_type`` that are broadcast over the batch (leading dim 1).

    Only declare a parameter if sample ``i`` of the output depends on it through slice ``i`` of its
    batch-expanded copy alone (true of an additive positional embedding or a prepended class token).

    Args:
        module_type: the exact module type that owns the parameters.
        names: attribute names of the parameters.
    """
    _BROADCAST_PARAMETERS[module_type] = tuple(names)


def _register_timm_vit() -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine usable without it
        return
    register_broadcast_parameters(VisionTransformer, ("cls_token", "reg_token", "pos_embed"))


_register_timm_vit()


def grad_sampler_for(module: nn.Module) -> Any | None:
    """The grad sampler Opacus has registered for ``type(module)`` (exact type), or ``None``."""
    return GradSampleModule.GRAD_SAMPLERS.get(type(module))


@dataclass(frozen=True)
class ModulePath:
    """How the per-sample gradients of one module's parameters are computed."""

    module: str
    type: str
    path: Path
    parameters: tuple[str, ...]


def _trainable(module: nn.Module, recurse: bool = False) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]


class PerSampleGradients:
    """Computes ``p.grad_sample`` for the trainable parameters of a model.

    Set :attr:`loss_scale` before each backward pass: the factor that turns the backpropagated loss
    into the *sum* of the per-sample losses (the batch size for a mean, 1 for a sum), so that
    ``grad_sample[i]`` is the gradient of sample ``i``'s own loss.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> engine = PerSampleGradients()
        >>> engine.attach(model)
        >>> engine.loss_scale = 5.0  # the loss below is a mean over 5 samples
        >>> with engine.capturing():
        ...     model(torch.randn(5, 3)).sum(dim=1).mean().backward()
        >>> model[0].weight.grad_sample.shape
        torch.Size([5, 4, 3])
    """

    def __init__(self) -> None:
        self.loss_scale = 1.0
        self.enabled = False
        self.parameters: list[nn.Parameter] = []
        self.parameter_names: dict[nn.Parameter, str] = {}
        self._paths: list[ModulePath] = []
        self._handles: list[RemovableHandle] = []
        self._activations: dict[nn.Module, list[list[torch.Tensor]]] = defaultdict(list)
        self._swapped: dict[nn.Module, dict[str, nn.Parameter]] = {}

    # ----------------------------------------------------------------------------------- set-up
    def attach(self, model: nn.Module) -> None:
        """Hook every module of ``model`` that owns parameters trainable *now*.

        Call :meth:`detach` and :meth:`attach` again after changing which parameters are trainable.
        """
        self.detach()
        covered: set[str] = set()  # prefixes handled by a functorch ancestor
        for name, module in model.named_modules():
            if any(name == c or name.startswith(c + ".") for c in covered):
                continue
            own = _trainable(module)
            if not own:
                continue
            broadcast = [n for n in _BROADCAST_PARAMETERS.get(type(module), ()) if n in dict(own)]
            rest = [(n, p) for n, p in own if n not in broadcast]
            if rest and grad_sampler_for(module) is None and not isinstance(module, LightningModule):
                # functorch re-runs the whole module, so it covers the broadcast parameters too (hooking
                # them as well would count their gradient twice). Opacus deep-copies the module here: do
                # it before adding hooks, or the copy carries them and the full backward hook fails
                # inside torch.func's transforms.
                covered.add(name)
                prepare_layer(module)
                self._attach_sampler(module)
                self._record(name, module, "functorch", [n for n, _ in _trainable(module, recurse=True)])
                continue
            if broadcast:
                self._attach_broadcast(module, broadcast)
                self._record(name, module, "broadcast", broadcast)
            if not rest:
                continue
            if grad_sampler_for(module) is not None:
                self._attach_sampler(module)
                self._record(name, module, "grad_sampler", [n for n, _ in rest])
            else:  # a LightningModule's own parameters
                self._record(name, module, "unsupported", [n for n, _ in rest])
        self.parameter_names = {p: n for n, p in model.named_parameters() if p.requires_grad}
        self.parameters = list(self.parameter_names)

    def detach(self) -> None:
        """Remove every hook and forget the recorded paths."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._paths.clear()
        self._activations.clear()
        self.parameters = []
        self.parameter_names = {}

    def paths(self) -> list[ModulePath]:
        """Which per-sample gradient path each hooked module takes."""
        return list(self._paths)

    def summary(self) -> str:
        """A readable table of :meth:`paths`."""
        rows = [("module", "type", "path", "parameters")]
        rows += [(p.module or "<root>", p.type, p.path, ", ".join(p.parameters)) for p in self._paths]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

    def _record(self, name: str, module: nn.Module, path: Path, params: list[str]) -> None:
        self._paths.append(ModulePath(name, type(module).__name__, path, tuple(params)))

    # ----------------------------------------------------------------------------------- capture
    def capturing(self) -> _Capture:
        """Context manager that enables the hooks for one forward/backward pass."""
        return _Capture(self)

    def _active(self, module: nn.Module) -> bool:
        return self.enabled and module.training and torch.is_grad_enabled()

    def _attach_sampler(self, module: nn.Module) -> None:
        self._handles.append(module.register_forward_hook(self._save_input))
        self._handles.append(module.register_full_backward_hook(self._compute))

    def _save_input(self, module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        if self._active(module):
            self._activations[module].append([t.detach() if torch.is_tensor(t) else t for t in inputs])

    def _compute(self, module: nn.Module, _grad_input: Any, grad_output: tuple[torch.Tensor, ...]) -> None:
        stack = self._activations.get(module)
        if not self.enabled or not stack:
            return
        activations = stack.pop()
        backprops = grad_output[0].detach() * self.loss_scale
        sampler = grad_sampler_for(module) or ft_compute_per_sample_gradient
        for param, grad_sample in sampler(module, activations, backprops).items():
            if param.requires_grad:
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    # Opacus' Embedding sampler ignores padding_idx, whose row gets no gradient in torch
                    grad_sample[:, module.padding_idx] = 0
                _accumulate(param, grad_sample)

    def _attach_broadcast(self, module: nn.Module, names: list[str]) -> None:
        def expand(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._active(mod) or not args or not torch.is_tensor(args[0]):
                return
            batch = args[0].shape[0]
            saved = {}
            for name in names:
                param = mod._parameters[name]
                if param is None or param.shape[0] != 1:
                    raise ValueError(
                        f"Broadcast parameter `{name}` of {type(mod).__name__} must have a leading "
                        f"dimension of size 1, found shape {tuple(param.shape) if param is not None else None}."
                    )
                expanded = param.expand(batch, *param.shape[1:])
                expanded.register_hook(self._broadcast_hook(param))
                saved[name] = param
                mod._parameters[name] = expanded  # read by the forward pass as the attribute
            self._swapped[mod] = saved

        def restore(mod: nn.Module, _args: Any, _output: Any) -> None:
            for name, param in self._swapped.pop(mod, {}).items():
                mod._parameters[name] = param

        self._handles.append(module.register_forward_pre_hook(expand))
        self._handles.append(module.register_forward_hook(restore, always_call=True))

    def _broadcast_hook(self, param: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            if self.enabled:  # grad of the [B, *shape[1:]] expansion; grad_sample is [B, *shape]
                _accumulate(param, grad.detach().unsqueeze(1) * self.loss_scale)

        return hook

    # ----------------------------------------------------------------------------------- results
    def clear(self) -> None:
        """Drop the stored per-sample gradients and activations."""
        for p in self.parameters:
            p.grad_sample = None
        self._activations.clear()

    def per_sample_norms(self, params: Iterable[nn.Parameter] | None = None) -> torch.Tensor:
        """L2 norm of each sample's gradient over ``params`` (all hooked parameters by default)."""
        params = self.parameters if params is None else list(params)
        # vector_norm avoids the full-size temporary that grad_sample.pow(2) would allocate
        norms = [
            torch.linalg.vector_norm(p.grad_sample.reshape(p.grad_sample.shape[0], -1), dim=1)
            for p in params
            if _has(p)
        ]
        if not norms:
            return torch.zeros(0)
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), dim=0)


def _has(p: nn.Parameter) -> bool:
    return getattr(p, "grad_sample", None) is not None


def _accumulate(param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    grad_sample = grad_sample.to(param.dtype)
    if _has(param):
        param.grad_sample = param.grad_sample + grad_sample
    else:
        param.grad_sample = grad_sample


class _Capture:
    def __init__(self, engine: PerSampleGradients) -> None:
        self.engine = engine

    def __enter__(self) -> PerSampleGradients:
        self.engine.enabled = True
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.engine.enabled = False


__all__ = ["ModulePath", "PerSampleGradients", "grad_sampler_for", "register_broadcast_parameters"]
