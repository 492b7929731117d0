"""The tracer preserves the model exactly: traced == eager, in train and in eval mode (issue: zoo)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from lcnnify import lcnnify, param_groups
from lcnnify.convert.trace import trace
from lcnnify.testing.zoo import create

MODELS = ["timm:resnet18", "timm:tf_efficientnet_b0", "timm:mixnet_s", "torchvision:googlenet",
          "torchvision:densenet121"]


@pytest.mark.parametrize("spec", MODELS)
@pytest.mark.parametrize("training", [True, False])
def test_traced_graph_computes_exactly_what_the_eager_model_computes(spec, training):
    torch.manual_seed(0)
    model = create(spec).train(training)
    x = torch.rand(2, 3, 32, 32)
    eager_model, traced_src = copy.deepcopy(model), copy.deepcopy(model)
    gm = fx.GraphModule(traced_src, trace(traced_src, training=training))
    gm.train(training)
    torch.manual_seed(1)
    ref = eager_model(x)
    torch.manual_seed(1)
    out = gm(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    out = out if isinstance(out, torch.Tensor) else out[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if training:  # same BatchNorm statistics updates
        for (k, a), (_, b) in zip(eager_model.state_dict().items(), traced_src.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_converted_resnet18_training_step_reaches_beta_and_gamma(spec):
    torch.manual_seed(0)
    model = lcnnify(create(spec), example_inputs=torch.randn(1, 3, 32, 32)).train()
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(model(x), y) + model.curvature_penalty()
    loss.backward()
    curv = {n: p for n, p in model.named_parameters() if "log_beta" in n or "log_gamma" in n}
    assert len([n for n in curv if "log_beta" in n]) == 17 and len([n for n in curv if "log_gamma" in n]) == 20
    for n, p in curv.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).all(), n
    before = {n: p.detach().clone() for n, p in curv.items()}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in curv.items())
