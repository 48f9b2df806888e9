"""Module bookkeeping (registration, names, modes, devices, state dicts), the layers, and init."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from reference import conv2d_reference

import tinyres
from tinyres import nn
from tinyres.nn import functional as F
from tinyres.nn import init


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(F.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def images(n=4, c=3, side=6, seed=0, device="cpu"):
    x = np.random.default_rng(seed).standard_normal((n, c, side, side), dtype=np.float32)
    return tinyres.tensor(x, device=device)


# ---- registration and traversal ----------------------------------------------------------

def test_named_parameters_follow_pytorch_names_and_order():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "body.0.weight", "body.0.bias", "fc.weight", "fc.bias"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert [n for n, _ in net.named_buffers()] == ["bn1.running_mean", "bn1.running_var"]
    assert [n for n, _ in net.named_modules()] == ["", "conv1", "bn1", "body", "body.0", "body.1", "pool", "fc"]
    assert [type(m).__name__ for m in net.children()] == ["Conv2d", "BatchNorm2d", "Sequential",
                                                          "AdaptiveAvgPool2d", "Linear"]


def test_state_dict_lists_each_modules_parameters_then_buffers():
    state = Net().state_dict()
    assert list(state) == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                           "body.0.weight", "body.0.bias", "fc.weight", "fc.bias"]
    assert all(type(a) is np.ndarray and a.dtype == np.float32 for a in state.values())


def test_state_dict_holds_copies():
    net = Net()
    state = net.state_dict()
    state["fc.bias"][:] = 42
    net.bn1.running_mean[:] = 7
    assert not np.any(net.fc.bias.numpy() == 42)
    assert not np.any(state["bn1.running_mean"] == 7)


def test_attribute_assignment_registers_and_replaces():
    m = nn.Module()
    m.w = nn.Parameter(np.zeros(2, dtype=np.float32))
    m.b = nn.Parameter(np.zeros(1, dtype=np.float32))
    m.w = nn.Parameter(np.ones(3, dtype=np.float32))  # reassigning keeps the position
    assert [n for n, _ in m.named_parameters()] == ["w", "b"] and m.w.shape == (3,)
    m.b = None  # no longer a parameter
    assert [n for n, _ in m.named_parameters()] == ["w"] and m.b is None
    m.register_buffer("stat", tinyres.tensor([1.0, 2.0]))
    assert isinstance(m.stat, np.ndarray)  # buffers are stored as arrays
    m.stat = np.zeros(2, dtype=np.float32)  # assigning to a buffer name replaces the buffer
    assert list(dict(m.named_buffers())) == ["stat"] and not m.stat.any()
    m.sub = nn.Linear(2, 2)
    del m.sub
    assert list(m.children()) == []
    with pytest.raises(AttributeError, match="nope"):
        m.nope  # noqa: B018


def test_assignment_before_super_init_is_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match=re.escape("super().__init__()")):
        Bad()


def test_shared_parameters_are_listed_once():
    m = nn.Module()
    m.a = nn.Linear(2, 2)
    m.b = m.a
    assert len(list(m.parameters())) == 2


def test_train_and_eval_reach_every_submodule():
    net = Net()
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net.body.train(False)
    assert net.training and not net.body[0].training and net.bn1.training


def test_zero_grad_sets_gradients_to_none():
    net = Net()
    F.cross_entropy(net(images()), np.array([0, 1, 0, 1])).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_sequential_indexing_iteration_and_length():
    layers = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3 and list(seq) == layers and seq[0] is layers[0] and seq[-1] is layers[2]
    assert list(seq[1:]) == layers[1:]
    x = tinyres.tensor(np.ones((5, 3), dtype=np.float32))
    np.testing.assert_array_equal(seq(x).numpy(), layers[2](layers[1](layers[0](x))).numpy())


def test_repr_shows_the_tree_and_settings():
    text = repr(Net())
    assert text.startswith("Net(\n  (conv1): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)")
    assert "  (body): Sequential(\n    (0): Conv2d(4, 4" in text
    assert "(fc): Linear(in_features=4, out_features=2, bias=True)" in text
    assert repr(nn.BatchNorm2d(8)) == "BatchNorm2d(8, eps=1e-05, momentum=0.1)"


# ---- devices and state dicts ---------------------------------------------------------------

def test_to_moves_parameters_and_buffers_in_place(device, xp):
    net = Net()
    params = list(net.parameters())
    assert net.to(device) is net
    assert list(net.parameters()) == params  # the same Parameter objects: optimizers keep working
    assert all(p.device == device and isinstance(p.data, xp.ndarray) for p in params)
    assert all(isinstance(b, xp.ndarray) for b in net.buffers())
    out = net(images(device=device))
    assert out.device == device and out.shape == (4, 2)
    net.to("cpu")
    assert all(type(b) is np.ndarray for b in net.buffers())


def test_load_state_dict_round_trip_keeps_dtype_and_device(device):
    src, dst = Net(), Net().to(device)
    state = src.state_dict()
    state["fc.weight"] = state["fc.weight"].astype(np.float64)  # converted to the parameter's float32
    state["fc.bias"] = tinyres.tensor(state["fc.bias"])  # Tensors are accepted too
    fc_weight = dst.fc.weight
    assert dst.load_state_dict(state) == ([], [])
    assert dst.fc.weight is fc_weight and dst.fc.weight.dtype == np.float32 and dst.fc.weight.device == device
    for name, a in dst.state_dict().items():
        np.testing.assert_array_equal(a, src.state_dict()[name], err_msg=name)


def test_load_state_dict_checks_everything_before_copying():
    net = Net()
    before = net.state_dict()
    state = Net().state_dict()
    del state["fc.bias"]
    state["extra.weight"] = np.zeros(3, dtype=np.float32)
    state["conv1.weight"] = np.zeros((4, 3, 5, 5), dtype=np.float32)
    with pytest.raises(RuntimeError) as err:
        net.load_state_dict(state)
    message = str(err.value)
    assert "missing: fc.bias (2,)" in message
    assert "unexpected: extra.weight (3,)" in message
    assert "conv1.weight expected (4, 3, 3, 3), got (4, 3, 5, 5)" in message
    for name, a in net.state_dict().items():  # nothing was copied, not even the names that fit
        np.testing.assert_array_equal(a, before[name], err_msg=name)


def test_load_state_dict_non_strict_reports_keys_but_still_refuses_wrong_shapes():
    net, state = Net(), Net().state_dict()
    del state["fc.bias"]
    state["extra"] = np.zeros(1)
    assert net.load_state_dict(state, strict=False) == (["fc.bias"], ["extra"])
    np.testing.assert_array_equal(net.fc.weight.numpy(), state["fc.weight"])
    state["fc.weight"] = np.zeros((3, 3))
    with pytest.raises(RuntimeError, match="fc.weight expected"):
        net.load_state_dict(state, strict=False)


# ---- layers -------------------------------------------------------------------------------

def test_layers_compute_their_definitions(device):
    x = images(device=device)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).to(device)
    nn.init.uniform_(conv.bias, -1, 1)  # a non-zero bias, so that adding it is checked too
    expected = conv2d_reference(x.numpy(), conv.weight.numpy(), conv.bias.numpy(), (2, 2), (1, 1))
    np.testing.assert_allclose(conv(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert conv(x).shape == (4, 5, 3, 3)
    assert nn.MaxPool2d(2)(x).shape == (4, 3, 3, 3)
    assert nn.AvgPool2d(3, stride=1, padding=1)(x).shape == (4, 3, 6, 6)
    assert nn.AdaptiveAvgPool2d(1)(x).shape == (4, 3, 1, 1)
    assert nn.Flatten()(x).shape == (4, 108)
    assert nn.Identity()(x) is x
    np.testing.assert_array_equal(nn.ReLU()(x).numpy(), np.maximum(x.numpy(), 0))
    fc = nn.Linear(108, 7).to(device)
    np.testing.assert_allclose(fc(nn.Flatten()(x)).numpy(),
                               x.numpy().reshape(4, -1) @ fc.weight.numpy().T + fc.bias.numpy(), rtol=1e-5, atol=1e-6)


def test_batch_norm_trains_on_batch_stats_and_evaluates_on_running_stats(device):
    bn = nn.BatchNorm2d(3, momentum=0.1).to(device)
    x = images(n=5, side=4, seed=1, device=device) * 2 + 1
    a = x.numpy().astype(np.float64)
    y = bn(x).numpy()  # training: normalized with the batch's own mean and (biased) variance
    mean, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))
    np.testing.assert_allclose(y, (a - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5), atol=1e-5)
    m = a.size // 3  # the running variance uses the unbiased estimate, as PyTorch
    np.testing.assert_allclose(tinyres.tensor(bn.running_mean).numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(tinyres.tensor(bn.running_var).numpy(), 0.9 + 0.1 * var * m / (m - 1), rtol=1e-5)

    bn.eval()
    before = bn.state_dict()
    y = bn(x).numpy()
    rm, rv = before["running_mean"], before["running_var"]
    np.testing.assert_allclose(y, (a - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.state_dict()["running_mean"], rm)  # eval leaves the statistics alone


def test_batch_norm_checks_input_rank():
    with pytest.raises(ValueError, match="4-D"):
        nn.BatchNorm2d(3)(tinyres.zeros(2, 3))
    assert nn.BatchNorm1d(3)(tinyres.tensor(np.arange(6.0, dtype=np.float32).reshape(2, 3))).shape == (2, 3)


# ---- init --------------------------------------------------------------------------------

def test_manual_seed_makes_construction_reproducible():
    init.manual_seed(123)
    a = Net().state_dict()
    init.manual_seed(123)
    b = Net().state_dict()
    c = Net().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(b["conv1.weight"], c["conv1.weight"])


def test_default_initialization():
    conv, bn, fc = nn.Conv2d(64, 128, 3), nn.BatchNorm2d(16), nn.Linear(256, 300)
    w = conv.weight.numpy()
    assert w.dtype == np.float32 and abs(w.mean()) < 0.01
    assert w.std() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)  # He: sqrt(2 / fan_in)
    assert not conv.bias.numpy().any()
    assert np.all(bn.weight.numpy() == 1) and not bn.bias.numpy().any()
    bound = 1 / math.sqrt(256)  # PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for p in (fc.weight.numpy(), fc.bias.numpy()):
        assert p.dtype == np.float32 and np.abs(p).max() <= bound and np.abs(p).max() > 0.9 * bound


def test_initializers(device):
    t = tinyres.zeros(200, 50, 3, 3, device=device)
    g = np.random.default_rng(0)
    init.kaiming_normal_(t, mode="fan_out", generator=g)
    assert t.device == device and t.dtype == np.float32
    assert t.numpy().std() == pytest.approx(math.sqrt(2 / (200 * 9)), rel=0.02)
    init.kaiming_uniform_(t)
    assert np.abs(t.numpy()).max() <= math.sqrt(6 / (50 * 9))
    assert t.numpy().std() == pytest.approx(math.sqrt(2 / (50 * 9)), rel=0.02)
    init.uniform_(t, 2.0, 3.0)
    assert 2 <= t.numpy().min() and t.numpy().max() < 3
    init.normal_(t, 5.0, 0.5)
    assert t.numpy().mean() == pytest.approx(5, abs=0.01)
    assert not init.zeros_(t).numpy().any() and np.all(init.ones_(t).numpy() == 1)
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_normal_(t, mode="fan_avg")


def test_cross_entropy_loss_module_matches_the_definition(device):
    logits = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    target = np.array([0, 3, 1, 1, 2])
    loss = nn.CrossEntropyLoss()(tinyres.tensor(logits, device=device), tinyres.tensor(target, device=device))
    z = logits.astype(np.float64)
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(5), target])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- hooks ---------------------------------------------------------------------------------

def test_forward_hooks_see_inputs_and_outputs_and_can_be_removed():
    net = Net().eval()
    seen = []
    handle = net.bn1.register_forward_hook(lambda m, inputs, output: seen.append((m, inputs[0].shape, output.shape)))
    x = images()
    net(x)
    assert seen == [(net.bn1, (4, 4, 6, 6), (4, 4, 6, 6))]
    handle.remove()
    net(x)
    assert len(seen) == 1  # removed: not called again
    handle.remove()  # a second remove is harmless


def test_forward_hooks_can_replace_inputs_and_outputs():
    relu = nn.ReLU()
    x = tinyres.tensor([-1.0, 2.0])
    pre = relu.register_forward_pre_hook(lambda m, inputs: (inputs[0] * -1,))
    post = relu.register_forward_hook(lambda m, inputs, output: output + 10)
    np.testing.assert_array_equal(relu(x).numpy(), [11.0, 10.0])  # relu(-x) + 10
    pre.remove()
    post.remove()
    np.testing.assert_array_equal(relu(x).numpy(), [0.0, 2.0])


def test_module_list_and_dict_register_their_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.heads = nn.ModuleDict({"cls": nn.Linear(4, 2), "box": nn.Linear(4, 4)})

        def forward(self, x):
            for block in self.blocks:
                x = F.relu(block(x))
            return self.heads["cls"](x)

    net = Net()
    assert len(list(net.parameters())) == 10 and "blocks.2.weight" in net.state_dict()
    assert "heads.box.bias" in dict(net.named_parameters())
    assert net(tinyres.randn(5, 4)).shape == (5, 2)
    blocks = net.blocks
    assert len(blocks) == 3 and blocks[-1] is blocks[2] and len(blocks[1:]) == 2
    blocks.append(nn.Linear(4, 4)).extend([nn.ReLU()])
    blocks[0] = nn.Identity()
    assert len(blocks) == 5 and isinstance(blocks[0], nn.Identity)
    with pytest.raises(IndexError, match="ModuleList index 5 out of range for 5 modules"):
        blocks[5]
    with pytest.raises(TypeError, match="ModuleList holds Modules, not int"):
        blocks.append(3)
    with pytest.raises(NotImplementedError, match="ModuleList has no forward"):
        blocks(tinyres.randn(1, 4))
    heads = net.heads
    assert list(heads) == ["cls", "box"] and "box" in heads and len(heads) == 2
    assert [k for k, _ in heads.items()] == list(heads.keys())
    del heads["box"]
    assert "heads.box.weight" not in net.state_dict()


def test_requires_grad_and_zero_grad_on_a_module():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)  # freeze the first layer
    model(tinyres.randn(4, 3)).sum().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    model.zero_grad(set_to_none=False)
    assert model[1].weight.grad is not None and not model[1].weight.grad.numpy().any()
    model.zero_grad()
    assert model[1].weight.grad is None


@pytest.mark.parametrize("name, advice", [("Dropout", "He et al. \\(2015\\) do not use it"),
                                          ("MSELoss", "\\(\\(output - target\\) \\*\\* 2\\).mean\\(\\)"),
                                          ("DataParallel", "run one process per device with mpiexec"),
                                          ("DistributedDataParallel", "nn.parallel.DistributedDataParallel")])
def test_left_out_layers_say_what_to_use_instead(name, advice):
    with pytest.raises(AttributeError, match=f"tinyres.nn has no {name}: .*{advice}"):
        getattr(nn, name)
    with pytest.raises(AttributeError, match="module 'tinyres.nn' has no attribute 'Nonsense'"):
        nn.Nonsense  # noqa: B018


def test_module_dtype_conversion_add_module_and_register_parameter():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model.add_module("head", nn.Linear(2, 1))
    model.register_parameter("scale", nn.Parameter(np.ones(1, np.float32)))
    assert "head.weight" in model.state_dict() and "scale" in model.state_dict()
    weight = model[0].weight
    assert model.to(tinyres.float64) is model and weight.dtype == np.float64 and weight is model[0].weight
    assert model[1].running_mean.dtype == np.float64
    assert model.float()[0].weight.dtype == np.float32 and model.double().head.bias.dtype == np.float64
    with pytest.raises(TypeError, match="register_parameter: 'w' must be a Parameter, got Tensor"):
        model.register_parameter("w", tinyres.zeros(1))
    with pytest.raises(TypeError, match="parameters must stay floating point, got int64"):
        model.to(tinyres.int64)


def test_nll_loss_of_log_softmax_is_cross_entropy():
    x = tinyres.tensor(np.random.default_rng(0).standard_normal((4, 5)), requires_grad=True)
    y = np.array([0, 3, 4, 1])
    for reduction in ("mean", "sum", "none"):
        np.testing.assert_allclose(F.nll_loss(F.log_softmax(x, 1), y, reduction=reduction).numpy(),
                                   F.cross_entropy(x, y, reduction=reduction).numpy(), rtol=1e-12)
    assert tinyres.gradcheck(lambda t: F.nll_loss(F.log_softmax(t, 1), y), [x])
    with pytest.raises(AttributeError, match="tinyres.nn.functional has no dropout: the networks of He et al."):
        F.dropout  # noqa: B018


def test_left_out_optimizers_and_parameter_groups_say_what_to_use_instead():
    model = nn.Linear(2, 1)
    with pytest.raises(AttributeError, match=r"tinyres.optim has no Adam: .*optim.SGD\(model.parameters\(\)"):
        tinyres.optim.Adam  # noqa: B018
    opt = tinyres.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="SGD.add_param_group: parameter groups are left out"):
        opt.add_param_group({"params": [nn.Parameter(np.zeros(1, np.float32))]})
