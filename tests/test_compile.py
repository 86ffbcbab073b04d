"""``torch.compile``: a compiled network or LightningModule gets the same clipped update as in eager mode.

Dynamo traces the strategy's forward hooks into the compiled frames (and recompiles as Poisson batch
sizes change); a hook that it dropped or replayed wrongly would leave a layer's gradient unclipped or
its per-sample norm out of the clip factors. Each step's update is checked against Σ_i clip(g_i)/n from
``torch.func`` on the eager network with the same parameters (σ = 0, q = 1, SGD with lr = 1).
``backend="aot_eager"`` runs Dynamo and AOTAutograd, where hooks are traced, without Inductor's code
generation (which only changes how the traced graph is executed, and takes minutes on CPU).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lightning_sparta import DPStrategy
from test_strategy import TinyModule, _trainer

CLIP = 0.05


class _CheckEveryStep(L.Callback):
    """Before each step, the torch.func clipped sum of the whole dataset; after it, the update must match."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.steps = net, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        x, y = module.dataset.tensors
        assert len(batch[0]) == len(x)  # q = 1: every sample in every step
        self.before = {k: v.detach().clone() for k, v in self.net.named_parameters()}

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(self.net, p, (xi[None],)), yi[None])

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(self.before, x, y)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
        factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
        self.expected = {k: torch.einsum("i,i...->...", factors, g) / len(x) for k, g in per_sample.items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for name, p in self.net.named_parameters():
            torch.testing.assert_close(self.before[name] - p.detach(), self.expected[name], rtol=1e-4, atol=1e-6)
        self.steps += 1


@pytest.mark.parametrize("clipping", ["per_sample", "auto"])
@pytest.mark.parametrize("compiled", ["network", "lightning_module"])
def test_compiled_model_gets_the_eager_clipped_update(compiled, clipping):
    """The update matches at every step, and the strategy says that compiling brings nothing."""
    L.seed_everything(0)
    module = TinyModule(batch_size=24)
    net = module.net
    if compiled == "network":
        module.net = torch.compile(net, backend="aot_eager")
    check = _CheckEveryStep(net)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=CLIP, clipping=clipping)
    fitted = torch.compile(module, backend="aot_eager") if compiled == "lightning_module" else module
    where = "net" if compiled == "network" else "the LightningModule"
    with pytest.warns(UserWarning, match=f"compiled with `torch.compile`: {where}. The clipped update is the same"):
        _trainer(strategy, max_epochs=3, callbacks=[check]).fit(fitted)
    assert check.steps == 3
    assert strategy.steps == 3
