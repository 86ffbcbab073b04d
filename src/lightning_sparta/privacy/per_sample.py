"""Per-sample gradients through module hooks, without wrapping the model.

:class:`PerSampleGradients` attaches a forward hook to every module that *directly* owns trainable
parameters. On each forward pass it keeps the layer's input and registers a *tensor* hook on the
layer's output, which receives the gradient of the loss with respect to that output; from both it
computes ``p.grad_sample`` of shape ``[batch, *p.shape]`` with the grad sampler that Opacus has
registered for the module's exact type (our sparse layers and timm's layers register theirs in
:mod:`lightning_sparta.sparse.grad_samplers`, norm layers in :mod:`lightning_sparta.privacy.batchnorm`).

Why tensor hooks and not ``register_full_backward_hook`` (Opacus' choice): a full backward hook wraps
the output in a ``BackwardHookFunction`` view, and any later in-place operation on it (timm's
``ReLU(inplace=True)``, a residual ``x += shortcut``) raises "Output 0 of BackwardHookFunction is a
view and is being modified inplace". A tensor hook registered *before* an in-place modification
receives the gradient with respect to the tensor's value before that modification (PyTorch's
documented semantics, "Behavior of Tensor hooks when Tensor is modified in-place"), which is exactly
the gradient of the module's output. Each forward call gets its own hook, holding its own input, so a
module called several times pairs every call with its own gradient.

A module whose sampler expects the gradient at an inner point rather than at its output (timm's
``BatchNormAct2d`` applies drop and activation after the affine map) is declared with
:func:`register_sampler_output`: the hook is then placed on the input of the named child.

Five paths exist, and :meth:`PerSampleGradients.paths` reports which one every module takes:

``"grad_sampler"``
    a registered closed-form sampler (Linear, Conv, norms, Embedding, our row-sparse layers...).
``"broadcast"``
    parameters with a leading batch-broadcast dimension of size 1 that a model owns directly and
    adds to every sample, such as ViT's ``cls_token``/``pos_embed``. They are declared per model type
    with :func:`register_broadcast_parameters`; during the forward pass each is expanded to the batch
    size, so the gradient of the expanded tensor *is* the per-sample gradient. Without this, the
    whole ViT's forward would be replayed per sample for these few parameters (path ``"functorch"``).
``"ghost"``
    a module with a ghost form, attached for a ghost clipping engine
    (:mod:`lightning_sparta.privacy.clipping`): its hook only keeps the input and the output gradient
    of every call (:meth:`PerSampleGradients.ghost_records`); no per-sample tensor is formed. The
    ``clipping`` column of :meth:`PerSampleGradients.summary` then says, after the first step, whether
    each weight's norm was a ghost norm or a materialised one, and at which shapes.
``"functorch"``
    any other module that owns trainable parameters: their per-sample gradients come from a
    ``torch.func`` replay of the module's forward per sample (:mod:`lightning_sparta.privacy.replay`),
    slow but exact. Its submodules keep their own paths, its buffers are read as constants; a forward
    that changes a buffer (statistics of the batch) is refused. Children whose weights the forward
    passes to a function instead of calling them (``nn.MultiheadAttention.out_proj``) are declared with
    :func:`register_functional_children` and replayed with their parent.
``"unsupported"``
    parameters owned directly by a LightningModule: they are typically used in ``training_step``,
    outside any forward pass, so no hook can see them. They get no per-sample gradient; the
    strategy refuses them on the first step if they receive a gradient.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils.hooks import RemovableHandle

from lightning_sparta._logging import shorten
from lightning_sparta.privacy.replay import OwnParameterReplay, buffer_versions, changed_buffers

Path = Literal["grad_sampler", "ghost", "broadcast", "functorch", "unsupported"]

_BROADCAST_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}
_SAMPLER_OUTPUTS: dict[type[nn.Module], tuple[str, ...]] = {}
_PATH_NOTES: list[Callable[[nn.Module], str | None]] = []


def register_broadcast_parameters(module_type: type[nn.Module], names: Iterable[str]) -> None:
    """Declare parameters of ``module_type`` that are broadcast over the batch (leading dim 1).

    Only declare a parameter if sample ``i`` of the output depends on it through slice ``i`` of its
    batch-expanded copy alone (true of an additive positional embedding or a prepended class token).

    Args:
        module_type: the exact module type that owns the parameters.
        names: attribute names of the parameters.
    """
    _BROADCAST_PARAMETERS[module_type] = tuple(names)


def register_sampler_output(module_type: type[nn.Module], children: Iterable[str]) -> None:
    """Declare that the grad sampler of ``module_type`` differentiates the input of a child module.

    Some modules apply more after the part their grad sampler describes: timm's ``BatchNormAct2d`` and
    ``GroupNormAct`` run ``self.drop`` and ``self.act`` after the normalisation's affine map. For such
    a type the engine takes the gradient at the input of the first child in ``children`` that the
    module has (e.g. ``("drop", "act")``), so the sampler sees the gradient of the affine output. That
    child must be called exactly once per forward pass of the module, on the affine output. A module
    that has none of the children uses its own output.

    Args:
        module_type: the exact module type.
        children: attribute names of candidate child modules, in order of preference.
    """
    _SAMPLER_OUTPUTS[module_type] = tuple(children)


_LAYER_SCALES: dict[type[nn.Module], tuple[dict[str, tuple[str, str]], Callable[[nn.Module], tuple[int, int]]]] = {}
_FUNCTIONAL_CHILDREN: dict[type[nn.Module], tuple[str, ...]] = {}


def register_functional_children(module_type: type[nn.Module], children: Iterable[str]) -> None:
    """Declare children of ``module_type`` whose parameters its forward uses without calling them.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` instead of
    calling ``out_proj``, so no hook of ``out_proj`` ever runs. The parameters of the declared children
    are then replayed with the module's own (path ``"functorch"``), and the children get no path of
    their own.
    """
    _FUNCTIONAL_CHILDREN[module_type] = tuple(children)


def _reparametrisation(module: nn.Module) -> str | None:
    """Why ``module``'s weights cannot be trained privately as they are, when they are recomputed before each
    forward from other tensors (pruning, weight or spectral normalisation, ``torch.nn.utils.parametrize``);
    ``None`` otherwise. No per-sample gradient path follows such a recomputation."""
    hooks = list(module._forward_pre_hooks.values())
    pruned = [h._tensor_name for h in hooks if isinstance(h, BasePruningMethod)]
    if pruned:
        return (
            f"is pruned with `torch.nn.utils.prune` (Lightning's ModelPruning): {shorten(pruned)} is recomputed as "
            "`<name>_orig * <name>_mask` before each forward, so the trainable parameter is `<name>_orig`, which "
            "its per-sample gradient path does not know. Make the pruning permanent first "
            "(`torch.nn.utils.prune.remove(module, name)`), then train; SpartaMaskCallback trains a sparse "
            "subset of rows privately."
        )
    normalised = [type(h).__name__ for h in hooks if isinstance(h, (WeightNorm, SpectralNorm))]
    if parametrize.is_parametrized(module):
        normalised += [f"parametrize: {name}" for name in module.parametrizations]
    if normalised:
        return (
            f"recomputes its weights from other tensors before each forward ({', '.join(normalised)}), and no "
            "per-sample gradient path follows that computation to the trainable tensors. Remove the "
            "reparametrisation before training (`torch.nn.utils.parametrize.remove_parametrizations`, "
            "`torch.nn.utils.remove_weight_norm`, `remove_spectral_norm`), or freeze the module."
        )
    return None


def functional_children(module: nn.Module) -> tuple[str, ...]:
    """Names of the children whose parameters ``module``'s forward uses without calling them."""
    return _FUNCTIONAL_CHILDREN.get(type(module), ())


def register_layer_scale(
    module_type: type[nn.Module],
    scales: dict[str, tuple[str, str]],
    layout: Callable[[nn.Module], tuple[int, int]] | None = None,
) -> None:
    """Declare parameters of ``module_type`` that scale a child's output channel-wise before another child.

    ``scales`` maps a parameter name (a ``[C]`` vector) to ``(source, sink)``: in the module's forward
    the parameter multiplies the output of child ``source`` and the product is the input of child ``sink``
    (typically ``gamma * attn(...)`` fed to ``drop_path``). Its per-sample gradient is then the output of
    ``source`` times the gradient at the input of ``sink``, summed over all but the batch and channel
    dimensions: no replay of the module, and stochastic depth in ``sink`` is taken into account. A sink
    may serve several parameters in turn (CaiT calls one ``drop_path`` twice). ``layout(module)`` gives
    the channel dimension of the source output and of the sink input (default ``(-1, -1)``). A wrong
    declaration is caught by the first-step check that per-sample gradients add up to the batch gradient.
    """
    _LAYER_SCALES[module_type] = (dict(scales), layout or (lambda _module: (-1, -1)))


def register_path_note(note: Callable[[nn.Module], str | None]) -> None:
    """Add a function that annotates a module's row of :meth:`PerSampleGradients.summary`.

    ``note(module)`` returns a short remark (e.g. ``"BN frozen stats"``) or ``None``.
    """
    _PATH_NOTES.append(note)


_SEPARATE_QKV_BIAS: tuple[type[nn.Module], ...] = ()


def _register_timm_vit() -> None:
    global _SEPARATE_QKV_BIAS
    try:
        from timm.models.beit import Attention as BeitAttention
        from timm.models.beit import Beit
        from timm.models.beit import Block as BeitBlock
        from timm.models.cait import Cait, LayerScaleBlock, LayerScaleBlockClassAttn
        from timm.models.convnext import ConvNeXtBlock
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.eva import Eva, EvaAttention
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine usable without it
        return
    register_broadcast_parameters(VisionTransformer, ("cls_token", "reg_token", "pos_embed"))
    # the distilled DeiTs prepend a distillation token next to the class token
    register_broadcast_parameters(VisionTransformerDistilled, ("cls_token", "dist_token", "reg_token", "pos_embed"))
    register_broadcast_parameters(Beit, ("cls_token", "pos_embed"))
    register_broadcast_parameters(Eva, ("cls_token", "reg_token", "pos_embed"))
    register_broadcast_parameters(Cait, ("cls_token", "pos_embed"))
    register_layer_scale(BeitBlock, {"gamma_1": ("attn", "drop_path1"), "gamma_2": ("mlp", "drop_path2")})
    for cait_block in (LayerScaleBlock, LayerScaleBlockClassAttn):
        register_layer_scale(cait_block, {"gamma_1": ("attn", "drop_path"), "gamma_2": ("mlp", "drop_path")})
    # ConvNeXt's MLP runs channels-last unless `use_conv_mlp`; gamma scales the channels-first result
    register_layer_scale(ConvNeXtBlock, {"gamma": ("mlp", "drop_path")}, lambda m: (1 if m.use_conv_mlp else -1, 1))
    # BEiT's and EVA's attention add their q/v biases by calling F.linear with the `qkv` child's weight,
    # so that child's forward (and hooks) never run; with `qkv_bias_separate` the same sum is computed as
    # `qkv(x) + bias`, and `qkv` gets its own path while the attention replays its biases
    _SEPARATE_QKV_BIAS = (BeitAttention, EvaAttention)


_register_timm_vit()


def _register_torch_and_torchvision() -> None:
    register_functional_children(nn.MultiheadAttention, ("out_proj",))
    try:
        from torchvision.models.convnext import CNBlock
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
        from torchvision.models.vision_transformer import Encoder, VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    # Swin's attention folds its windows into the batch inside `shifted_window_attention`, which takes the
    # weights of `qkv` and `proj` (and V2's `cpb_mlp` output) as arguments: replayed as one per-sample
    # function of the [B, H, W, C] input, the folding stays inside each sample
    register_functional_children(ShiftedWindowAttention, ("qkv", "proj"))
    register_functional_children(ShiftedWindowAttentionV2, ("qkv", "proj", "cpb_mlp"))
    register_broadcast_parameters(VisionTransformer, ("class_token",))
    register_broadcast_parameters(Encoder, ("pos_embedding",))
    # `layer_scale * block(x)`, both channels-first, then stochastic depth
    register_layer_scale(CNBlock, {"layer_scale": ("block", "stochastic_depth")}, lambda _m: (1, 1))


_register_torch_and_torchvision()


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
    note: str = ""  # e.g. "BN frozen stats": how the module is made compatible with per-sample gradients
    clipping: str = ""  # how the clipping engine took this module's norms (set once a step has run)


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
        # set by DPStrategy: a hooked call's gradient arriving outside `backward_pass()` is refused (a
        # `torch.autograd.grad` inside `training_step`), instead of being added to the per-sample gradients
        self.refuse_other_backward_passes = False
        self._backward_depth = 0
        # "ghost" modules: run the forward with detached parameters, so that autograd does not compute
        # a batch weight gradient that the clipping engine replaces by its own clipped sum anyway
        self.skip_ghost_parameter_gradients = False
        self._detached: dict[nn.Module, dict[tuple[nn.Module, str], nn.Parameter]] = {}
        self.parameters: list[nn.Parameter] = []
        self.parameter_names: dict[nn.Parameter, str] = {}
        self._paths: list[ModulePath] = []
        self._handles: list[RemovableHandle] = []
        # calls whose output gradient has not arrived yet (dropped by clear())
        self._activations: dict[nn.Module, list[_Call]] = defaultdict(list)
        self._tapping: dict[nn.Module, list[_Call]] = defaultdict(list)  # open forward calls, see _attach_tap
        self._swapped: dict[nn.Module, dict[str, nn.Parameter]] = {}
        self._ghost: dict[nn.Module, str] = {}  # modules whose calls are recorded, not sampled
        self._replays: dict[nn.Module, OwnParameterReplay] = {}  # the "functorch" path
        self._separated: list[nn.Module] = []  # attention modules switched to `qkv_bias_separate`, see attach
        self._buffer_versions: dict[nn.Module, list[dict[str, int]]] = defaultdict(list)
        self._records: dict[nn.Module, list[tuple[list[Any], torch.Tensor, float]]] = defaultdict(list)
        self._clipping_notes: dict[str, str] = {}

    # ----------------------------------------------------------------------------------- set-up
    def attach(self, model: nn.Module, ghost: Callable[[nn.Module], bool] | None = None) -> None:
        """Hook every module of ``model`` that owns parameters trainable *now*.

        Call :meth:`detach` and :meth:`attach` again after changing which parameters are trainable.

        Args:
            model: the model.
            ghost: modules for which ``ghost(module)`` is true only record their inputs and output
                gradients (path ``"ghost"``) instead of computing ``grad_sample``. A module that shares
                a trainable parameter with another module keeps its grad sampler.
        """
        self.detach()
        for module in model.modules():
            separable = isinstance(module, _SEPARATE_QKV_BIAS) and getattr(module, "q_bias", None) is not None
            if separable and not module.qkv_bias_separate:  # the same values, computed through the `qkv` child
                module.qkv_bias_separate = True
                self._separated.append(module)
        owners: dict[int, int] = defaultdict(int)
        for module in model.modules():
            for _, p in _trainable(module):
                owners[id(p)] += 1
        absorbed: set[nn.Module] = set()  # children whose parameters their parent uses functionally
        for name, module in model.named_modules():
            if module in absorbed:
                continue
            own = _trainable(module)
            for child_name in functional_children(module):
                child = getattr(module, child_name, None)
                if isinstance(child, nn.Module):
                    absorbed.update(child.modules())
                    own += [(f"{child_name}.{n}", p) for n, p in _trainable(child, recurse=True)]
            if own and getattr(module, "batch_first", None) is False:  # nn.MultiheadAttention, RNNs
                raise ValueError(
                    f"`{name or '<root>'}` ({type(module).__name__}) has `batch_first=False`: its inputs, and those of "
                    "the layers around it, are [tokens, batch, features], so per-sample gradients (taken along the "
                    "first dimension) would be per token. Build it with `batch_first=True`, or freeze its parameters."
                )
            reparametrised = _reparametrisation(module)
            if reparametrised and any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"`{name or '<root>'}` ({type(module).__name__}) {reparametrised}")
            if not own:
                continue
            broadcast = [n for n in _BROADCAST_PARAMETERS.get(type(module), ()) if n in dict(own)]
            rest = [(n, p) for n, p in own if n not in broadcast]
            recorded = (
                ghost is not None
                and bool(rest)
                and not isinstance(module, LightningModule)
                and all(owners[id(p)] == 1 for _, p in rest)
                and ghost(module)
            )
            scales = _LAYER_SCALES.get(type(module))
            declared = [n for n, _ in rest if scales is not None and n in scales[0]] if not recorded else []
            if declared and grad_sampler_for(module) is None:
                self._attach_layer_scales(module, declared)
                self._record(name, module, "grad_sampler", declared)
                rest = [(n, p) for n, p in rest if n not in declared]
            if rest and not recorded and grad_sampler_for(module) is None and not isinstance(module, LightningModule):
                # the replay keeps a parameter-free copy of the module: make it before adding any hook
                self._replays[module] = OwnParameterReplay(module, [n for n, _ in rest], name or "<root>")
                self._attach_replay(module, name)
                self._record(name, module, "functorch", [n for n, _ in rest])
                rest = []
            if broadcast:
                self._attach_broadcast(module, broadcast)
                self._record(name, module, "broadcast", broadcast)
            if not rest:
                continue
            if recorded:
                self._ghost[module] = name
                self._attach_detached_parameters(module, [n for n, _ in rest])
                self._attach_sampler(module)
                self._record(name, module, "ghost", [n for n, _ in rest])
            elif grad_sampler_for(module) is not None:
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
        self._ghost.clear()
        self._replays.clear()
        self._buffer_versions.clear()
        for module in self._separated:
            module.qkv_bias_separate = False
        self._separated.clear()
        self._clipping_notes.clear()
        self._drop_pending()
        self._tapping.clear()
        self.parameters = []
        self.parameter_names = {}

    def paths(self) -> list[ModulePath]:
        """Which per-sample gradient path each hooked module takes, and how its norms were clipped."""
        return [replace(p, clipping=self._clipping(p)) for p in self._paths]

    def _clipping(self, row: ModulePath) -> str:
        if row.path != "ghost":
            return "per-sample"
        prefix = f"{row.module}." if row.module else ""
        notes = [
            f"{n}: {self._clipping_notes[prefix + n]}" for n in row.parameters if prefix + n in self._clipping_notes
        ]
        return "; ".join(notes) if notes else "ghost/book-keeping (norm path chosen at the first step)"

    def set_clipping_notes(self, notes: dict[str, str]) -> None:
        """Record, per parameter name, how the clipping engine took its norm (shown by :meth:`summary`)."""
        self._clipping_notes.update(notes)

    def compact_summary(self) -> str:
        """A few lines for the console: per path, how many modules take it, counted by module type.

        The full table (:meth:`summary`, one row per module) is for files and ``DEBUG`` logging: a
        ViT-tiny alone has 75 rows.
        """
        paths = self.paths()
        by_path: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        notes: dict[str, int] = defaultdict(int)
        for row in paths:
            by_path[row.path][row.type] += 1
            if row.note:
                notes[row.note] += 1
        tensors = sum(len(row.parameters) for row in paths)
        lines = [f"{len(paths)} modules with trainable parameters ({tensors} tensors)"]
        width = max((len(path) for path in by_path), default=0)
        for path, types in by_path.items():
            ranked = sorted(types.items(), key=lambda item: (-item[1], item[0]))
            shown = ", ".join(f"{name} {count}" for name, count in ranked[:6])
            more = f", {len(ranked) - 6} more types" if len(ranked) > 6 else ""
            slow = "  <- slow fallback" if path == "functorch" else ""
            lines.append(f"  {path.ljust(width)}  {sum(types.values()):4d}  ({shown}{more}){slow}")
        if notes:
            lines.append("  notes: " + ", ".join(f"{note} ({count})" for note, count in notes.items()))
        return "\n".join(lines)

    def summary(self) -> str:
        """A readable table of :meth:`paths`."""
        rows = [("module", "type", "path", "parameters", "clipping", "note")]
        rows += [
            (p.module or "<root>", p.type, p.path, ", ".join(p.parameters), p.clipping, p.note) for p in self.paths()
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def _record(self, name: str, module: nn.Module, path: Path, params: list[str]) -> None:
        notes = [n for note in _PATH_NOTES if (n := note(module))]
        self._paths.append(ModulePath(name, type(module).__name__, path, tuple(params), "; ".join(notes)))

    # ----------------------------------------------------------------------------------- capture
    def capturing(self) -> _Capture:
        """Context manager that enables the hooks for one forward/backward pass."""
        return _Capture(self)

    @contextmanager
    def backward_pass(self) -> Iterator[None]:
        """Mark the step's own backward pass: only there may hooked calls receive their output gradients."""
        self._backward_depth += 1
        try:
            yield
        finally:
            self._backward_depth -= 1

    def _check_backward_pass(self) -> None:
        if self.refuse_other_backward_passes and not self._backward_depth:
            raise RuntimeError(
                "DPStrategy: a backward pass ran inside `training_step` (`torch.autograd.grad`, or `.backward()` "
                "on another loss). The hooks would add its gradients to the per-sample gradients of the step's "
                "loss, and a gradient of the batch loss with respect to the parameters mixes every sample into "
                "the others' gradients. To perturb the inputs along their own gradients (FGSM/PGD adversarial "
                "examples), run that forward and backward pass inside "
                "`with lightning_sparta.privacy.input_gradients(self):`, which hides the parameters from it (the "
                "forward too: the gradient must not pass through a layer run before it), with a summed loss so "
                "that each input's gradient is its own. Gradient penalties "
                "(`create_graph=True`) and inner optimisation steps on the weights are not supported."
            )

    def _active(self, module: nn.Module) -> bool:
        # Not `module.training`: a trainable layer put in eval() (dropout off, a backbone's statistics kept)
        # still has a per-sample gradient, and skipping it left its parameters without one. Evaluation
        # runs without gradients, and the hooks record only while capturing; nothing inside
        # `input_gradients` is recorded.
        return self.enabled and torch.is_grad_enabled() and not _INPUT_GRADIENTS

    def _attach_sampler(self, module: nn.Module) -> None:
        candidates = _SAMPLER_OUTPUTS.get(type(module), ())
        children = [c for c in candidates if isinstance(getattr(module, c, None), nn.Module)]
        if children:
            self._attach_tap(module, getattr(module, children[0]), children[0])
        else:  # with the keyword inputs: a ghost form may need them (an attention's masks)
            self._handles.append(module.register_forward_hook(self._hook_output_kwargs, with_kwargs=True))

    def _hook_output_kwargs(self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any):
        self._hook_output(module, inputs, output, kwargs)

    def _hook_output(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Any, kwargs: dict[str, Any] | None = None
    ) -> None:
        """Forward hook: keep the input and hook the output, whose gradient arrives in the backward pass."""
        if not self._active(module):
            return
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if torch.is_tensor(out) and out.requires_grad:
            call = _Call(module, inputs, kwargs)
            self._activations[module].append(call)
            out.register_hook(self._backward_hook(call))

    def _attach_layer_scales(self, module: nn.Module, names: list[str]) -> None:
        """Per-sample gradients of declared layer scales (:func:`register_layer_scale`) from two taps per call."""
        scales, layout = _LAYER_SCALES[type(module)]
        frames: list[list[tuple[str, torch.Tensor]]] = []  # per open call of `module`: sources' outputs in order

        def open_call(mod: nn.Module, _args: Any) -> None:
            frames.append([])

        def close_call(mod: nn.Module, _args: Any, _output: Any) -> None:
            if frames:
                frames.pop()

        def source_hook(param: str) -> Callable[..., None]:
            def hook(_child: nn.Module, _args: Any, output: Any) -> None:
                if frames and self._active(module):
                    out = output[0] if isinstance(output, (tuple, list)) else output
                    frames[-1].append((param, out.detach()))

            return hook

        def sink_hook(sink: str) -> Callable[..., None]:
            def hook(_child: nn.Module, args: tuple[Any, ...]) -> None:
                if not frames or not args or not torch.is_tensor(args[0]) or not args[0].requires_grad:
                    return
                pending = frames[-1]
                index = next((i for i, (p, _) in enumerate(pending) if scales[p][1] == sink), None)
                if index is None:
                    return
                param, source_out = pending.pop(index)
                args[0].register_hook(self._layer_scale_hook(module, param, source_out, layout(module)))

            return hook

        self._handles.append(module.register_forward_pre_hook(open_call))
        self._handles.append(module.register_forward_hook(close_call, always_call=True))
        for param in names:
            self._handles.append(module.get_submodule(scales[param][0]).register_forward_hook(source_hook(param)))
        for sink in dict.fromkeys(scales[n][1] for n in names):
            self._handles.append(module.get_submodule(sink).register_forward_pre_hook(sink_hook(sink)))

    def _layer_scale_hook(
        self, module: nn.Module, name: str, source_out: torch.Tensor, dims: tuple[int, int]
    ) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self.enabled:
                return
            self._check_backward_pass()
            param = module.get_parameter(name)
            source, sink = dims
            values = source_out if source % source_out.dim() == sink % grad.dim() else source_out.movedim(source, sink)
            channel = sink % grad.dim()
            reduce = [d for d in range(1, grad.dim()) if d != channel]
            wide = torch.promote_types(grad.dtype, torch.float32)
            per_sample = (values.to(wide) * grad.to(wide)).sum(reduce) * self.loss_scale  # [B, C]
            _accumulate(param, per_sample.view(grad.shape[0], *param.shape))

        return hook

    def _attach_replay(self, module: nn.Module, name: str) -> None:
        """Keep every input of each call (keyword arguments too) and refuse a forward that changes a buffer."""
        check = any(True for _ in module.buffers())

        def before(mod: nn.Module, _args: Any) -> None:
            if check and self._active(mod):
                self._buffer_versions[mod].append(buffer_versions(mod))

        def after(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._active(mod):
                return
            versions = self._buffer_versions[mod].pop() if check and self._buffer_versions[mod] else None
            if output is None:  # the forward raised (this hook is always called): let that error through
                return
            changed = changed_buffers(mod, versions) if versions is not None else []
            if changed:
                raise RuntimeError(
                    f"`{name or '<root>'}` ({type(mod).__name__}) changed its buffers {shorten(changed)} in its "
                    "forward pass: statistics of the batch mix the samples, so its per-sample gradients are "
                    "not defined and the statistics themselves would be released without noise. Put the layer "
                    "in eval mode (frozen statistics) or freeze its parameters."
                )
            self._hook_output(mod, args, output, kwargs)

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))

    def _attach_tap(self, module: nn.Module, child: nn.Module, child_name: str) -> None:
        """Hook the input of ``child`` (called inside ``module``'s forward) instead of ``module``'s output.

        The tensor hook must be registered before the in-place operations that may follow inside the
        module's forward (``act`` with ``inplace=True``), so it is placed by a pre-hook of the child;
        the module's forward hook then decides whether the call is captured and supplies the input.
        """

        def open_call(mod: nn.Module, _args: Any) -> None:
            call = _Call(mod, ())
            call.pending = False  # until close_call accepts it
            self._tapping[mod].append(call)

        def tap(_child: nn.Module, args: tuple[Any, ...]) -> None:
            calls = self._tapping.get(module)
            if not calls or calls[-1].tapped or not args or not torch.is_tensor(args[0]):
                return  # not inside a forward call of `module`, or already tapped in this call
            call = calls[-1]
            call.tapped = True
            if self.enabled and args[0].requires_grad:
                args[0].register_hook(self._backward_hook(call))

        def close_call(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            calls = self._tapping.get(mod)
            call = calls.pop() if calls else None
            if call is None or output is None or not self._active(mod):
                return  # output is None when the forward raised (this hook is always called)
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not call.tapped and torch.is_tensor(out) and out.requires_grad:
                raise RuntimeError(
                    f"{type(mod).__name__}.{child_name} was not called during the forward pass of its parent: its "
                    "grad sampler needs the gradient at that child's input (see `register_sampler_output`)."
                )
            call.set_inputs(inputs)
            call.pending = True
            self._activations[mod].append(call)

        self._handles.append(module.register_forward_pre_hook(open_call))
        self._handles.append(child.register_forward_pre_hook(tap))
        self._handles.append(module.register_forward_hook(close_call, always_call=True))

    def _backward_hook(self, call: _Call) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if call.pending:  # recorded while capturing
                self._check_backward_pass()
            if self.enabled and call.pending:
                self._compute(call, grad)

        return hook

    def _compute(self, call: _Call, grad_output: torch.Tensor) -> None:
        module = call.module
        activations = call.take()
        stack = self._activations.get(module)
        if stack and call in stack:
            stack.remove(call)
        if module in self._ghost:  # the clipping engine takes norms and sums from (input, output gradient)
            # unscaled: the engine applies the scale to the norms and the clip factors, [B] vectors, instead
            # of copying every layer's output gradient
            inputs = [*activations, call.kwargs] if call.kwargs else activations  # keyword inputs last, as a dict
            self._records[module].append((inputs, grad_output.detach(), self.loss_scale))
            return
        backprops = grad_output.detach() if self.loss_scale == 1 else grad_output.detach() * self.loss_scale
        replay = self._replays.get(module)
        if replay is not None:
            grads = replay(module, activations, call.kwargs, backprops)
        else:
            grads = grad_sampler_for(module)(module, activations, backprops)
        for param, grad_sample in grads.items():
            if param.requires_grad:
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    # Opacus' Embedding sampler ignores padding_idx, whose row gets no gradient in torch
                    grad_sample[:, module.padding_idx] = 0
                _accumulate(param, grad_sample)

    def _drop_pending(self) -> None:
        for calls in self._activations.values():
            for call in calls:
                call.cancel()
        self._activations.clear()
        self._records.clear()

    def ghost_records(self) -> list[tuple[nn.Module, str, list[tuple[list[Any], torch.Tensor, float]]]]:
        """``(module, name, calls)`` for every ``"ghost"`` module that ran in the current pass.

        Each call is ``(inputs, grad_output, scale)``: the module's detached inputs, the gradient of the
        loss with respect to its output, and the :attr:`loss_scale` of the pass. Per-sample gradients are
        linear in ``grad_output``, so they are ``scale`` times those of ``grad_output`` as recorded.
        """
        return [(m, self._ghost[m], calls) for m, calls in self._records.items() if calls]

    def _attach_detached_parameters(self, module: nn.Module, names: list[str]) -> None:
        """While :attr:`skip_ghost_parameter_gradients` is set, run ``module`` on detached parameters.

        The clipping engine computes the clipped sum of a ``"ghost"`` module from its recorded input
        and output gradient, so autograd's batch gradient of its parameters would be computed for
        nothing (a third of the layer's backward cost). The parameters are detached only when an
        input requires grad: the output then still requires grad and its gradient still arrives.
        """

        def detach(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not (self.skip_ghost_parameter_gradients and self._active(mod)):
                return
            if not any(torch.is_tensor(a) and a.requires_grad for a in args):
                return  # e.g. the first layer: its output would need no gradient at all
            saved = {}
            for name in names:  # "out_proj.weight": a functional child's parameter, see register_functional_children
                prefix, _, leaf = name.rpartition(".")
                owner = mod.get_submodule(prefix) if prefix else mod
                param = owner._parameters[leaf]
                if param is not None:
                    saved[(owner, leaf)] = param
                    owner._parameters[leaf] = param.detach()  # read by the forward pass as the attribute
            self._detached[mod] = saved

        def restore(mod: nn.Module, _args: Any, _output: Any) -> None:
            for (owner, leaf), param in self._detached.pop(mod, {}).items():
                owner._parameters[leaf] = param

        self._handles.append(module.register_forward_pre_hook(detach))
        self._handles.append(module.register_forward_hook(restore, always_call=True))

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
                self._check_backward_pass()
                _accumulate(param, grad.detach().unsqueeze(1) * self.loss_scale)

        return hook

    # ----------------------------------------------------------------------------------- results
    def clear(self) -> None:
        """Drop the stored per-sample gradients and activations."""
        for p in self.parameters:
            p.grad_sample = None
        self._drop_pending()

    def per_sample_norms(self, params: Iterable[nn.Parameter] | None = None) -> torch.Tensor:
        """L2 norm of each sample's gradient over ``params`` (all hooked parameters by default)."""
        params = self.parameters if params is None else list(params)
        # vector_norm avoids the full-size temporary that grad_sample.pow(2) would allocate
        # accumulated in at least fp32 (bf16 per-sample gradients), without narrowing fp64
        norms = [
            torch.linalg.vector_norm(
                p.grad_sample.reshape(p.grad_sample.shape[0], -1),
                dim=1,
                dtype=torch.promote_types(p.grad_sample.dtype, torch.float32),
            )
            for p in params
            if has_grad_sample(p)
        ]
        if not norms:
            return torch.zeros(0)
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), dim=0)


_INPUT_GRADIENTS = 0  # open `input_gradients` contexts: the hooks record nothing inside them


@contextmanager
def input_gradients(module: nn.Module) -> Iterator[None]:
    """Take gradients with respect to the inputs inside ``training_step``, for adversarial examples.

    Inside the context every trainable parameter of ``module`` is replaced by a detached copy of itself
    and the per-sample gradient hooks record nothing: a forward and backward pass there can give the
    gradient of the loss with respect to the inputs, never one with respect to the parameters (through
    the module's attributes or through references kept from before). DP-SGD then clips the gradient of
    the loss that ``training_step`` returns, taken outside the context, at the perturbed inputs.

    Privacy: sample ``i``'s perturbed input must depend on sample ``i`` alone. Sum the inner loss over
    the samples (``reduction="sum"``): a mean scales every input gradient by ``1 / batch size``, and the
    (Poisson) batch size depends on which other samples were drawn. A step along the gradient's sign
    (FGSM, PGD) does not depend on that scale. BatchNorm statistics are frozen by the strategy, and the
    other ways a batch can mix its samples are listed in the README;
    :func:`~lightning_sparta.privacy.check_sample_independence` finds a mean-reduced inner loss (it
    leaves a sample out) and most of those ways on one batch.

    Example:
        >>> def training_step(self, batch, batch_idx):
        ...     x, y = batch
        ...     with input_gradients(self):
        ...         x_adv = x.clone().requires_grad_(True)
        ...         (g,) = torch.autograd.grad(F.cross_entropy(self(x_adv), y, reduction="sum"), x_adv)
        ...     return F.cross_entropy(self((x + 8 / 255 * g.sign()).detach()), y)
    """
    global _INPUT_GRADIENTS
    hidden = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None and param.requires_grad:
                owner._parameters[name] = param.detach()  # read by the forward pass as the attribute
                hidden.append((owner, name, param))
    _INPUT_GRADIENTS += 1
    try:
        yield
    finally:
        _INPUT_GRADIENTS -= 1
        for owner, name, param in reversed(hidden):
            owner._parameters[name] = param


def has_grad_sample(p: nn.Parameter) -> bool:
    """Whether ``p`` holds per-sample gradients of the current micro-batch."""
    return getattr(p, "grad_sample", None) is not None


def _accumulate(param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    grad_sample = grad_sample.to(param.dtype)
    if has_grad_sample(param):
        param.grad_sample = param.grad_sample + grad_sample
    else:
        param.grad_sample = grad_sample


class _Call:
    """One forward call of a hooked module: its inputs, until the gradient of its output arrives."""

    __slots__ = ("inputs", "kwargs", "module", "pending", "tapped", "versions")

    def __init__(self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        self.module = module
        self.pending = True
        self.tapped = False
        self.set_inputs(inputs, kwargs)

    def set_inputs(self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        self.inputs = [t.detach() if torch.is_tensor(t) else t for t in inputs]
        # keyword arguments: the replay passes them to the module again, a ghost form may read them (masks)
        self.kwargs = {k: v.detach() if torch.is_tensor(v) else v for k, v in (kwargs or {}).items()}
        # detach() shares the version counter: a later in-place change of an input is detected in take()
        self.versions = [t._version if torch.is_tensor(t) else None for t in (*self.inputs, *self.kwargs.values())]

    def take(self) -> list[Any]:
        """The inputs, once (keyword ones stay in ``kwargs``); raises if one was modified in place since the forward."""
        self.pending = False
        inputs, self.inputs = self.inputs, []
        names = [f"Input {i}" for i in range(len(inputs))] + [f"Keyword input `{k}`" for k in self.kwargs]
        tensors = [*inputs, *self.kwargs.values()]
        for name, t, version in zip(names, tensors, self.versions, strict=True):
            if version is not None and t._version != version:
                raise RuntimeError(
                    f"{name} of {type(self.module).__name__} was modified in place after its forward pass; "
                    "its per-sample gradient would use the modified values. Make that operation out of place."
                )
        return inputs

    def cancel(self) -> None:
        self.pending = False
        self.inputs = []
        self.kwargs = {}


class _Capture:
    def __init__(self, engine: PerSampleGradients) -> None:
        self.engine = engine

    def __enter__(self) -> PerSampleGradients:
        self.engine.enabled = True
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.engine.enabled = False


def sum_of_losses(output: Any, batch_size: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(loss to backpropagate, the batch's mean loss for display, loss scale)`` of a ``training_step`` output.

    The loss scale is what the hooks multiply the recorded output gradients by so that per-sample
    gradients are those of each sample's own loss: the batch size for a mean-reduced scalar loss, 1 for
    a summed one or for one loss per sample (``[batch]``, summed here).

    Raises:
        TypeError: if the output holds no loss tensor.
        ValueError: if the loss is neither a scalar nor one loss per sample.
    """
    loss = output["loss"] if isinstance(output, dict) else output
    if loss is None:
        raise TypeError(
            "`training_step` returned None, which in Lightning skips the batch. Under DP-SGD a decision taken "
            "on the whole batch lets one sample remove every other sample's contribution, beyond the clipping "
            "bound. Return the loss: samples whose gradient is NaN or infinite are left out one by one already, "
            "and a weight of each sample's own (`(losses * keep).sum()`) leaves out others."
        )
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"`training_step` must return a loss tensor or a dict with a 'loss' tensor, got {type(loss).__name__}."
        )
    if loss.dim() == 1 and loss.shape[0] == batch_size:  # one loss per sample
        return loss.sum(), loss.detach().mean(), 1.0
    if loss.dim() != 0:
        raise ValueError(
            f"`training_step` returned a loss of shape {tuple(loss.shape)}: return a scalar or one loss "
            f"per sample (shape [{batch_size}])."
        )
    if reduction == "mean":
        return loss, loss.detach(), float(batch_size)
    return loss, loss.detach() / batch_size, 1.0


__all__ = [
    "ModulePath",
    "PerSampleGradients",
    "functional_children",
    "grad_sampler_for",
    "has_grad_sample",
    "input_gradients",
    "register_broadcast_parameters",
    "register_functional_children",
    "register_layer_scale",
    "register_path_note",
    "register_sampler_output",
    "sum_of_losses",
]
