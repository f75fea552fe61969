"""CollapsibleActivation, injection exactness on the tiny grid, and the regulariser Σ(1−α)²."""

from __future__ import annotations

import pytest
import torch
from helpers import PLAIN, make_inputs, max_abs_diff, max_rel_diff, outputs, set_alphas, tiny_model
from torch import nn

import hf_layercollapse as hlc
from hf_layercollapse.targets import Identity, PReLU

# ---------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU(), nn.SiLU(), nn.Tanh()], ids=lambda a: type(a).__name__)
def test_blend_is_exact_at_both_ends_and_linear_in_alpha(act):
    x = torch.randn(64, 16) * 3
    wrapped = hlc.CollapsibleActivation(act, Identity(), init_alpha=0.0)
    assert torch.equal(wrapped(x), act(x))  # α = 0: the original activation, bit for bit
    with torch.no_grad():
        wrapped.alpha.fill_(1.0)
    assert torch.equal(wrapped(x), x)  # α = 1: the identity
    with torch.no_grad():
        wrapped.alpha.fill_(0.3)
    torch.testing.assert_close(wrapped(x), 0.3 * x + 0.7 * act(x), rtol=0, atol=1e-6)


def test_prelu_slope():
    x = torch.linspace(-4, 4, 81)
    wrapped = hlc.CollapsibleActivation(nn.GELU(), PReLU(), init_alpha=0.01)
    expected = torch.where(x >= 0, x, 0.01 * x)
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-7)
    assert not torch.allclose(wrapped(x), nn.GELU()(x), atol=1e-3)  # it replaces the activation
    with torch.no_grad():
        wrapped.alpha.fill_(1.0)
    assert torch.equal(wrapped(x), x)


def test_alpha_is_one_element_parameter_with_gradient():
    wrapped = hlc.CollapsibleActivation(nn.GELU(), init_alpha=0.5)
    assert isinstance(wrapped.alpha, nn.Parameter) and wrapped.alpha.shape == (1,)  # FSDP rejects 0-dim
    x = torch.randn(8)
    wrapped(x).sum().backward()
    # d/dα [α·x + (1−α)·gelu(x)] = x − gelu(x)
    torch.testing.assert_close(wrapped.alpha.grad, (x - nn.functional.gelu(x)).sum().reshape(1))
    assert wrapped.alpha_value == 0.5 and "alpha=0.5000" in repr(wrapped)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keeps_input_dtype(dtype):
    wrapped = hlc.CollapsibleActivation(nn.GELU(), init_alpha=0.5)
    assert wrapped(torch.randn(4, dtype=dtype)).dtype == dtype


def test_target_tensors_must_match_the_target():
    with pytest.raises(ValueError, match="needs the tensors"):
        hlc.CollapsibleActivation(nn.GELU(), Identity(), tensors={"slope": torch.ones(3)})


# -------------------------------------------------------------------------------------- injection grid


@pytest.mark.parametrize("name", PLAIN)
def test_injecting_twice_raises(name):
    model = tiny_model(name)
    hlc.get_collapse_model(model)
    with pytest.raises(ValueError, match="already have collapsible activations"):
        hlc.get_collapse_model(model)
    # the wrappers were not wrapped again
    acts = hlc.injected_activations(model).values()
    assert all(not isinstance(a.activation, hlc.CollapsibleActivation) for a in acts)


def test_injecting_other_blocks_later_is_allowed():
    model = tiny_model("bert")
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[0]))
    with pytest.raises(ValueError, match="already"):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[0, 1]))
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[1]))
    assert list(hlc.injected_activations(model)) == ["encoder.layer.0", "encoder.layer.1"]


@pytest.mark.parametrize("name", PLAIN)
def test_prelu_replaces_activation_and_is_identity_at_one(name):
    model = tiny_model(name)
    inputs = make_inputs(model)
    before = outputs(model, inputs)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(activation="prelu"))
    assert all(a.alpha_value == pytest.approx(0.01) for a in hlc.injected_activations(model).values())
    assert max_abs_diff(outputs(model, inputs), before) > 1e-4  # the paper's PReLU changes the model at init

    # at α = 1 the prelu model equals the same model with every activation replaced by the identity
    set_alphas(model, 1.0)
    prelu_linear = outputs(model, inputs)
    for act in hlc.injected_activations(model).values():
        act.activation = nn.Identity()
        act.target = Identity()
    assert max_rel_diff(prelu_linear, outputs(model, inputs)) <= 1e-6


def test_injection_keeps_dtype_and_device():
    model = tiny_model("bert").to(torch.bfloat16)
    hlc.get_collapse_model(model)
    assert {a.alpha.dtype for a in hlc.injected_activations(model).values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ regulariser


def test_regularization_loss_is_sum_of_squares_with_gradient():
    model = tiny_model("bert")
    hlc.get_collapse_model(model)
    set_alphas(model, 0.1, 0.7)
    loss = hlc.regularization_loss(model)
    assert loss.item() == pytest.approx(0.9**2 + 0.3**2, abs=1e-6)
    loss.backward()
    grads = [a.alpha.grad.item() for a in hlc.injected_activations(model).values()]
    assert grads == pytest.approx([-2 * 0.9, -2 * 0.3], abs=1e-6)  # d/dα (1−α)² = −2(1−α)


def test_regularization_loss_after_forward_uses_that_forward():
    model = tiny_model("gpt2")
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(layers_to_transform=[-1]))
    set_alphas(model, 0.25)
    out = model(**make_inputs(model)).last_hidden_state
    loss = out.pow(2).mean() + 0.5 * hlc.regularization_loss(model)
    loss.backward()
    (act,) = hlc.injected_activations(model).values()
    assert hlc.regularization_loss(model).item() == pytest.approx(0.75**2)
    # the gradient on α is the task part plus 0.5 · −2(1−α): check the regulariser part alone
    task_only = model(**make_inputs(model)).last_hidden_state.pow(2).mean()
    act.alpha.grad = None
    task_only.backward()
    task_grad = act.alpha.grad.item()
    act.alpha.grad = None
    model(**make_inputs(model)).last_hidden_state.pow(2).mean().add(0.5 * hlc.regularization_loss(model)).backward()
    assert act.alpha.grad.item() - task_grad == pytest.approx(0.5 * -2 * 0.75, abs=1e-5)


def test_regularization_loss_after_evaluation_forward_keeps_its_gradient():
    """A forward pass under no_grad (evaluation) must not leave a gradient-less term behind."""
    model = tiny_model("bert")
    hlc.get_collapse_model(model)
    set_alphas(model, 0.5)
    inputs = make_inputs(model)
    with torch.no_grad():
        model(**inputs)
        assert hlc.regularization_loss(model).item() == pytest.approx(0.5)  # evaluation reads the recorded terms
        model(**inputs)
    loss = hlc.regularization_loss(model)
    assert loss.requires_grad and loss.item() == pytest.approx(0.5)
    loss.backward()
    assert [a.alpha.grad.item() for a in hlc.injected_activations(model).values()] == pytest.approx([-1.0, -1.0])


def test_regularization_loss_zero_at_one():
    model = tiny_model("t5")
    hlc.get_collapse_model(model)
    set_alphas(model, 1.0)
    assert hlc.regularization_loss(model).item() == 0.0


def test_regularization_loss_needs_injection():
    with pytest.raises(ValueError, match="no collapsible activations"):
        hlc.regularization_loss(tiny_model("bert"))


def test_in_place_activations_blend_and_collapse_exactly():
    # nn.ReLU(inplace=True) overwrites its input: a blend that read the input afterwards saw relu(z), not z
    act = hlc.CollapsibleActivation(nn.ReLU(inplace=True), init_alpha=0.5)
    z = torch.randn(64)
    expected = 0.5 * torch.relu(z) + 0.5 * z
    torch.testing.assert_close(act(z.clone()), expected, rtol=0, atol=1e-7)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x = torch.randn(5, 8)
    reference = model(x)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(), example_inputs={"input": x})
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # α = 0: the original model
    for act in hlc.injected_activations(model).values():
        act.alpha.data.fill_(1.0)
    linear = model(x)
    assert not torch.allclose(linear, reference, atol=1e-3)  # α = 1 is the linear model, not the ReLU one
    hlc.collapse_model(model)
    torch.testing.assert_close(model(x), linear, rtol=1e-5, atol=1e-6)


def test_an_activation_the_forward_reaches_another_way_is_refused_at_injection():
    class ListHead(nn.Module):  # layers registered as children and also kept in a plain list the forward loops over
        def __init__(self) -> None:
            super().__init__()
            self.layers = []
            for i, layer in enumerate([nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)]):
                self.add_module(str(i), layer)
                self.layers.append(layer)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.other = ListHead(), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            return self.other(self.head(x))

    torch.manual_seed(0)
    model, x = Model(), torch.randn(3, 8)
    reference = model(x)
    with pytest.raises(ValueError, match=r"blocks \['head'\] without going through.*exclude_modules=\['head'\]"):
        hlc.get_collapse_model(model, hlc.LayerCollapseConfig(), example_inputs={"x": x})
    assert isinstance(model.head.get_submodule("1"), nn.GELU) and torch.equal(model(x), reference)  # left as it was
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(exclude_modules=["head"]), example_inputs={"x": x})
    assert list(hlc.injected_activations(model)) == ["other"]
