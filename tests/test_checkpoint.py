"""Checkpoints: resuming is exact, saving is atomic, and a bad file changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tinyres
from tinyres import nn, optim
from tinyres.atomic import AtomicWriteError
from tinyres.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyres.nn import functional as F
from tinyres.nn import init


def tiny_net(seed: int) -> nn.Module:
    init.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def training_run(seed: int):
    model = tiny_net(seed)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = optim.WarmupLR(opt, optim.MultiStepLR(opt, [3]), warmup_lr=0.05, until_iter=1)
    return model, opt, sched


BATCHES = [(np.random.default_rng(i).standard_normal((6, 3, 5, 5), dtype=np.float32),
            np.random.default_rng(i).integers(0, 3, 6)) for i in range(6)]


def train(model, opt, sched, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(tinyres.tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name], err_msg=name)


def save_version_1(path, model, optimizer, scheduler, extra) -> None:
    """A checkpoint as tinyres wrote it before the one format: arrays model/..., optim/... and a JSON meta."""
    arrays = {f"model/{name}": a for name, a in model.state_dict().items()}
    state = optimizer.state_dict()
    for i, per_param in state["state"].items():
        for name, a in per_param.items():
            arrays[f"optim/{i}/{name}"] = a
    meta = {"format": "tinyres-checkpoint", "version": 1, "extra": extra,
            "optimizer": {"type": type(optimizer).__name__, "param_groups": state["param_groups"]},
            "scheduler": {"type": type(scheduler).__name__, "state": scheduler.state_dict()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize("write", [save_checkpoint, save_version_1], ids=["checkpoint", "version-1-checkpoint"])
def test_save_load_continue_equals_never_stopping(tmp_path, write):
    model, opt, sched = training_run(seed=0)
    train(model, opt, sched, BATCHES)

    model2, opt2, sched2 = training_run(seed=0)
    train(model2, opt2, sched2, BATCHES[:3])
    path = tmp_path / "ckpt.npz"
    write(path, model2, opt2, sched2, extra={"iteration": 3})
    assert tinyres.load(path)["extra"] == {"iteration": 3}

    model3, opt3, sched3 = training_run(seed=1)  # a different start: everything must come from the file
    assert load_checkpoint(path, model3, opt3, sched3) == {"iteration": 3}
    train(model3, opt3, sched3, BATCHES[3:])
    assert_same_state(model3.state_dict(), model.state_dict())  # bit for bit, running statistics included
    np.testing.assert_array_equal(opt3.state[0]["momentum_buffer"], opt.state[0]["momentum_buffer"])
    assert opt3.lr == opt.lr and sched3.state_dict() == sched.state_dict()


def test_file_holds_plain_arrays_and_json_and_no_tmp_is_left(tmp_path):
    model, opt, sched = training_run(seed=0)
    train(model, opt, sched, BATCHES[:1])
    rng = np.random.default_rng(7)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, opt, sched, extra={"iteration": 1, "rng": rng.bit_generator.state})
    save_checkpoint(path, model, opt, sched, extra={"iteration": 1, "rng": rng.bit_generator.state})  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: loading runs no code
        assert "__tree__" in z.files and all(z[k].dtype != object for k in z.files)

    extra = load_checkpoint(path, tiny_net(1))
    restored = np.random.default_rng()
    restored.bit_generator.state = extra["rng"]  # 128-bit integers survive JSON
    assert restored.random() == rng.random()


def test_a_checkpoint_is_what_tinyres_load_reads(tmp_path):
    model, opt, sched = training_run(seed=0)
    train(model, opt, sched, BATCHES[:2])
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, opt, sched, extra={"iteration": 2, "mean": np.ones((2, 2, 3), np.float32)})
    ckpt = tinyres.load(path)  # as torch.load gives back a checkpoint dict
    assert ckpt["format"] == "tinyres-checkpoint" and ckpt["version"] == 2
    assert_same_state(ckpt["model"], model.state_dict())
    assert ckpt["optimizer"]["type"] == "SGD" and list(ckpt["optimizer"]["state"]) == [0, 1, 2, 3, 4]
    assert ckpt["scheduler"]["state"] == sched.state_dict() and ckpt["extra"]["iteration"] == 2
    np.testing.assert_array_equal(ckpt["extra"]["mean"], np.ones((2, 2, 3)))
    model2 = tiny_net(1)
    model2.load_state_dict(ckpt["model"])
    assert_same_state(model2.state_dict(), model.state_dict())


def test_a_saved_state_dict_loads_a_model_but_not_an_optimizer(tmp_path):
    model, opt, _ = training_run(seed=0)
    path = tmp_path / "weights.npz"
    tinyres.save(model.state_dict(), path)
    other = tiny_net(1)
    assert load_checkpoint(path, other) == {}
    assert_same_state(other.state_dict(), model.state_dict())
    with pytest.raises(CheckpointError, match=r"weights.npz: not a training checkpoint but a file of tinyres.save "
                                              r"holding a state dict of 7 arrays; read it with tinyres.load"):
        load_checkpoint(path, other, opt)


def test_extra_must_be_json(tmp_path):
    path = tmp_path / "ckpt.npz"
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, tiny_net(0), extra={"bad": object()})
    assert not list(tmp_path.iterdir())


def test_a_crash_while_writing_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    old = tiny_net(0)
    save_checkpoint(path, old)

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_net(1))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
    model = tiny_net(2)
    load_checkpoint(path, model)
    assert_same_state(model.state_dict(), old.state_dict())


def rewrite(src, dst, change) -> None:
    """Copy checkpoint `src` to `dst` with `change(checkpoint)` applied to the dict `tinyres.load` gives."""
    ckpt = tinyres.load(src)
    change(ckpt)
    tinyres.save(ckpt, dst)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a trained tiny net, its optimizer and schedule."""
    model, opt, sched = training_run(seed=0)
    train(model, opt, sched, BATCHES[:2])
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, opt, sched)
    return path


def check_refused(path, match: str) -> None:
    """Loading `path` raises a CheckpointError naming the file and matching `match`; nothing changes."""
    model, opt, sched = training_run(seed=3)
    before, opt_before, sched_before = model.state_dict(), opt.state_dict(), sched.state_dict()
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path, model, opt, sched)
    assert str(path) in str(err.value)
    assert_same_state(model.state_dict(), before)
    assert opt.state_dict()["state"] == opt_before["state"] == {} and sched.state_dict() == sched_before


def test_missing_tensor_is_refused(saved, tmp_path):
    bad = tmp_path / "bad.npz"
    rewrite(saved, bad, lambda c: c["model"].pop("5.bias"))
    check_refused(bad, r"missing: 5\.bias \(3,\)")


def test_misshaped_tensor_is_refused(saved, tmp_path):
    bad = tmp_path / "bad.npz"
    rewrite(saved, bad, lambda c: c["model"].update({"0.weight": np.zeros((4, 3, 5, 5), dtype=np.float32)}))
    check_refused(bad, r"0\.weight expected \(4, 3, 3, 3\), got \(4, 3, 5, 5\)")


def test_misshaped_optimizer_state_is_refused_before_the_model_is_touched(saved, tmp_path):
    bad = tmp_path / "bad.npz"
    rewrite(saved, bad, lambda c: c["optimizer"]["state"][3].update({"momentum_buffer": np.zeros(7, np.float32)}))
    check_refused(bad, r"optimizer state 3/momentum_buffer: expected shape \(3, 4\), got \(7,\)")


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file_is_refused(saved, tmp_path, keep):
    data = saved.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[:int(len(data) * keep)])
    check_refused(bad, "truncated or corrupt")


def test_corrupted_bytes_are_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside an array: only the zip CRC can tell
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    check_refused(bad, "truncated or corrupt")


def test_missing_metadata_key_is_named(saved, tmp_path):
    bad = tmp_path / "bad.npz"

    rewrite(saved, bad, lambda c: c["optimizer"].pop("type"))
    check_refused(bad, "metadata has no 'type'")


def test_saving_into_a_missing_folder_is_one_clear_error(tmp_path):
    path = tmp_path / "gone" / "ckpt.npz"
    with pytest.raises(AtomicWriteError, match=f"cannot write {path}") as info:
        save_checkpoint(path, tiny_net(0))
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---- tinyres.save / tinyres.load -------------------------------------------------------------

def test_save_and_load_state_dicts_round_trip(tmp_path):
    model, opt, sched = training_run(seed=0)
    train(model, opt, sched, BATCHES[:2])
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": np.int64(2), "note": None}
    path = tmp_path / "state.npz"
    tinyres.save(state, path)
    back = tinyres.load(path)
    assert_same_state(back["model"], model.state_dict())
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert list(back["optimizer"]["state"]) == list(opt.state_dict()["state"]) == [0, 1, 2, 3, 4]  # ints stay ints
    assert back["scheduler"] == sched.state_dict() and back["step"] == 2 and back["note"] is None

    model2, opt2, sched2 = training_run(seed=1)
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    np.testing.assert_array_equal(opt2.state[0]["momentum_buffer"], opt.state[0]["momentum_buffer"])
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: loading runs no code
        assert all(z[k].dtype != object for k in z.files)


def test_save_refuses_objects_and_load_refuses_other_files(tmp_path, saved):
    with pytest.raises(TypeError, match="cannot store a object"):
        tinyres.save({"bad": object()}, tmp_path / "x.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(CheckpointError, match="other.npz: not a file written by tinyres.save or a training run"):
        tinyres.load(other)
