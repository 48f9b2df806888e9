"""A CIFAR training script as a PyTorch user writes it runs on tinyres with only its imports changed.

`SCRIPT` is plain PyTorch (it is run under PyTorch too, where installed, so it stays honest);
for tinyres its import lines are swapped for tinyres's and nothing else is touched.
"""

from __future__ import annotations

import importlib.util
import runpy

import pytest

TORCH_IMPORTS = """\
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
"""

TINYRES_IMPORTS = """\
import tinyres as torch
import tinyres.nn as nn
import tinyres.nn.functional as F
import tinyres.optim as optim
"""

SCRIPT = TORCH_IMPORTS + '''
import numpy as np

torch.manual_seed(0)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
rng = np.random.default_rng(0)
labels_all = rng.integers(0, 10, 96)
# a learnable stand-in for CIFAR-10: the class shifts the mean of one colour channel
images_all = rng.normal(0, 1, (96, 3, 16, 16)).astype(np.float32)
images_all[np.arange(96), labels_all % 3] += (labels_all / 3.0)[:, None, None].astype(np.float32)
loader = [(torch.tensor(images_all[i:i + 16]), torch.tensor(labels_all[i:i + 16])) for i in range(0, 64, 16)]
test_loader = [(torch.from_numpy(images_all[64:]), torch.from_numpy(labels_all[64:]))]


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2, 2)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        for block in self.blocks:
            x = F.relu(block(x)) + x
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x.view(x.size(0), -1))


model = Net().to(device)
n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
scheduler = optim.lr_scheduler.MultiStepLR(opt, milestones=[8], gamma=0.1)

history = []
for epoch in range(10):
    model.train()
    running_loss, correct, total = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        running_loss += loss.item() * x.size(0)
        _, pred = out.max(1)
        correct += (pred == y).sum().item()
        total += y.size(0)
    scheduler.step()
    history.append((running_loss / total, correct / total, opt.param_groups[0]["lr"]))

model.eval()
test_loss, test_correct, test_total = 0.0, 0, 0
with torch.no_grad():
    for images, labels in test_loader:
        outputs = model(images.to(device))
        test_loss += F.cross_entropy(outputs, labels, reduction="sum").item()
        _, predicted = torch.max(outputs.data, 1)
        test_total += labels.size(0)
        test_correct += (predicted == labels).sum().item()
        pred = outputs.argmax(dim=1, keepdim=True)
        assert pred.eq(labels.view_as(pred)).sum().item() == test_correct
        probs = F.softmax(outputs, dim=1)
        assert abs(probs.sum(dim=1).mean().item() - 1) < 1e-5
        assert criterion(outputs, labels).item() > 0

torch.save(model.state_dict(), checkpoint_path)
restored = Net()
restored.load_state_dict(torch.load(checkpoint_path))
restored.eval()
with torch.no_grad():
    again = restored(test_loader[0][0])
    assert (again.argmax(1) == outputs.argmax(1)).all().item()
result = {"params": n_params, "history": history, "test_accuracy": test_correct / test_total,
          "test_loss": test_loss / test_total}
'''


def run_script(imports: str, tmp_path) -> dict:
    script = tmp_path / "cifar_script.py"
    script.write_text(SCRIPT.replace(TORCH_IMPORTS, imports))
    return runpy.run_path(str(script), init_globals={"checkpoint_path": str(tmp_path / "model.pt")})["result"]


def test_a_pytorch_training_script_runs_on_tinyres_with_only_the_imports_changed(tmp_path):
    result = run_script(TINYRES_IMPORTS, tmp_path)
    first_loss, first_acc, _ = result["history"][0]
    last_loss, last_acc, last_lr = result["history"][-1]
    assert result["params"] == 8 * 3 * 9 + 16 + 2 * (8 * 8 * 9 + 8) + 8 * 10 + 10
    assert last_loss < 0.7 * first_loss and last_acc > first_acc  # it learns
    assert last_lr == pytest.approx(0.005)
    assert 0 <= result["test_accuracy"] <= 1 and result["test_loss"] > 0


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_the_script_is_plain_pytorch(tmp_path):
    torch_result = run_script(TORCH_IMPORTS, tmp_path)
    tinyres_result = run_script(TINYRES_IMPORTS, tmp_path)
    assert torch_result["params"] == tinyres_result["params"]
    assert [h[2] for h in torch_result["history"]] == pytest.approx([h[2] for h in tinyres_result["history"]])
