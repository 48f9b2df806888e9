"""The GPU against the CPU, and how the tests find (or fail to find) a usable GPU.

The `test_gpu_*` tests take the `gpu` fixture: they run on a machine with CuPy and a GPU, skip
without one, and fail when CuPy is installed but broken or when TINYRES_REQUIRE_GPU=1. The
`test_gpu_status_*` and `test_require_gpu_*` tests run everywhere: they put stand-ins for CuPy
in front of a child process, since a real CuPy cannot be made to lack a driver on demand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import assert_same_state, final_state, synthetic_cifar, tiny_config

import tinyres
from tinyres import models, optim
from tinyres.backend import device_of
from tinyres.checkpoint import load_checkpoint, save_checkpoint
from tinyres.data import per_pixel_mean
from tinyres.nn import functional as F
from tinyres.train import evaluate, read_metrics, train, train_step

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# ---- finding the GPU: runs everywhere --------------------------------------------------------

# Each stand-in is a `cupy` package that behaves as CuPy does on a machine in one state.
STANDIN_HEAD = '''
from types import SimpleNamespace
__version__ = "14.0.0"

class CUDARuntimeError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status

def raises(status, message):
    def call():
        raise CUDARuntimeError(status, message)
    return call
'''
CUPY_STANDINS = {
    "no driver": "cuda = SimpleNamespace(runtime=SimpleNamespace(driverGetVersion=lambda: 0))",
    "no device": "cuda = SimpleNamespace(runtime=SimpleNamespace(driverGetVersion=lambda: 13000, getDeviceCount="
                 "raises(100, 'cudaErrorNoDevice: no CUDA-capable device is detected')))",
    "old driver": "cuda = SimpleNamespace(runtime=SimpleNamespace(driverGetVersion=lambda: 12020, getDeviceCount="
                  "raises(35, 'cudaErrorInsufficientDriver: CUDA driver version is insufficient')))",
    "no nvrtc": "cuda = SimpleNamespace(runtime=SimpleNamespace(driverGetVersion=lambda: 13000, "
                "getDeviceCount=lambda: 1))\n"
                "def asarray(a):\n    raise RuntimeError('libnvrtc.so.13: cannot open shared object file')",
    "import fails": "raise ImportError('libcudart.so.13: cannot open shared object file')",
}


def standin(tmp_path: Path, state: str) -> Path:
    """A folder holding a stand-in `cupy` package for `state`, to put first on PYTHONPATH."""
    folder = tmp_path / state.replace(" ", "-")
    (folder / "cupy").mkdir(parents=True)
    (folder / "cupy" / "__init__.py").write_text(STANDIN_HEAD + CUPY_STANDINS[state] + "\n")
    return folder


def child_env(*path: Path, require_gpu: bool = False) -> dict[str, str]:
    """This environment with `path` first on PYTHONPATH and TINYRES_REQUIRE_GPU set or unset."""
    env = {k: v for k, v in os.environ.items() if k != "TINYRES_REQUIRE_GPU"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*path, REPO])
    if require_gpu:
        env["TINYRES_REQUIRE_GPU"] = "1"
    return env


def status_in_child(env: dict[str, str], before: str = "") -> tuple[bool, str, bool, bool]:
    """gpu_status() and cuda_available() as a fresh process sees them."""
    code = (f"import json; {before}from tinyres.backend import gpu_status, cuda_available; "
            "print(json.dumps([*gpu_status(), cuda_available()]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout))


@pytest.mark.parametrize("state, broken, reason", [
    ("no driver", False, "CuPy 14.0.0 is installed but there is no NVIDIA driver (no GPU)"),
    ("no device", False, "CuPy 14.0.0: the NVIDIA driver finds no GPU"),
    ("old driver", True, "CuPy 14.0.0: the CUDA driver fails: CUDARuntimeError: cudaErrorInsufficientDriver"),
    ("no nvrtc", True, "CuPy 14.0.0 sees 1 GPU(s) but cannot run a kernel: RuntimeError: libnvrtc.so.13"),
    ("import fails", True, "CuPy is installed but does not import: ImportError: libcudart.so.13"),
])
def test_gpu_status_tells_a_missing_gpu_from_a_broken_cupy(tmp_path, state, broken, reason):
    usable, got_reason, got_broken, available = status_in_child(child_env(standin(tmp_path, state)))
    assert (usable, got_broken, available) == (False, broken, False)
    assert got_reason.startswith(reason)


def test_gpu_status_without_cupy_names_the_install():
    # sys.modules["cupy"] = None is how Python marks a module as absent: import and find_spec fail
    usable, reason, broken, available = status_in_child(child_env(), before="import sys; sys.modules['cupy'] = None; ")
    assert (usable, broken, available) == (False, False, False)
    assert reason == "CuPy is not installed (pip install 'tinyres[cuda13]' (CUDA 13) or 'tinyres[cuda]' (CUDA 12))"


def test_moving_to_a_broken_gpu_says_why(tmp_path):
    code = "import tinyres; tinyres.tensor([1.0], device='cuda')"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(standin(tmp_path, "no nvrtc")),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "RuntimeError: device 'cuda': CuPy 14.0.0 sees 1 GPU(s) but cannot run a kernel" in done.stderr


TINY_TESTS = '''
def test_on_each_device(device):
    assert device in ("cpu", "cuda")

def test_on_the_gpu(gpu):
    assert gpu == "cuda"
'''


def pytest_in_child(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run TINY_TESTS with tests/conftest.py as a plugin, in a fresh pytest process."""
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    env = {**env, "PYTHONPATH": env["PYTHONPATH"] + os.pathsep + str(REPO / "tests")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rs",
                           "test_tiny.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_require_gpu_turns_the_skip_into_a_failure(tmp_path):
    env = child_env(standin(tmp_path, "no device"))
    done = pytest_in_child(tmp_path, env)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]  # -rs lists the reasons
    assert len(skips) == 2 and all(s.endswith(": CuPy 14.0.0: the NVIDIA driver finds no GPU") for s in skips)

    done = pytest_in_child(tmp_path, {**env, "TINYRES_REQUIRE_GPU": "1"})
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert ("ERROR: TINYRES_REQUIRE_GPU=1 but no usable GPU: CuPy 14.0.0: the NVIDIA driver finds no GPU"
            in done.stderr)
    assert "passed" not in done.stdout  # stopped before running anything


def test_a_broken_cupy_fails_the_gpu_tests_instead_of_skipping(tmp_path):
    done = pytest_in_child(tmp_path, child_env(standin(tmp_path, "no nvrtc")))
    assert done.returncode == pytest.ExitCode.TESTS_FAILED
    assert "1 passed, 2 errors" in done.stdout  # a failure in a fixture is an error of the test's setup
    assert done.stdout.count("\nthe GPU cannot be used: CuPy 14.0.0 sees 1 GPU(s) but cannot run a kernel") == 2


# ---- the GPU against the CPU: needs a GPU ----------------------------------------------------

def three_sgd_steps(device: str, float64: bool = False) -> dict[str, np.ndarray]:
    """Everything three SGD steps of ResNet-20 compute from seed 0, as NumPy arrays by name."""
    tinyres.manual_seed(0)
    model = models.cifar_resnet(20)
    if float64:
        for p in model.parameters():
            p.data = p.data.astype(np.float64)
        for m in model.modules():
            for name, b in list(m.named_buffers(recurse=False)):
                setattr(m, name, b.astype(np.float64))
    model.to(device)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    out = {}
    for step in range(3):
        x = rng.standard_normal((16, 3, 32, 32), dtype=np.float32)
        x = tinyres.tensor(x.astype(np.float64) if float64 else x, device=device)
        y = tinyres.tensor(rng.integers(0, 10, 16), device=device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out[f"step {step} loss"], out[f"step {step} logits"] = loss.numpy(), logits.numpy()
        out.update({f"step {step} grad {name}": p.grad.numpy() for name, p in model.named_parameters()})
    assert {device_of(p.data) for p in model.parameters()} | {device_of(b) for b in model.buffers()} == {device}
    out.update({f"final {name}": a for name, a in model.state_dict().items()})  # parameters, BN running stats
    out.update({f"momentum {i}": s["momentum_buffer"] for i, s in opt.state_dict()["state"].items()})
    return out


def relative_error(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - reference) / max(np.linalg.norm(reference), 1e-30))


@pytest.mark.gpu
def test_gpu_matches_cpu_in_three_sgd_steps(gpu):
    """Loss, logits, every gradient, parameter, BN statistic and momentum buffer, on the GPU and on the CPU.

    At lr 0.1 with momentum, three steps on random labels amplify rounding: float32 and float64
    runs on the CPU differ by up to ~20% in some third-step gradients. So each float32 run is
    measured against a float64 run on the CPU, and the GPU may be off by at most 10 times what
    the CPU's float32 is off: the same arithmetic in another order. A wrong kernel shows already
    in the first step, where the CPU's float32 is within 1e-2 of float64 for every array.
    """
    on_gpu, on_cpu, exact = three_sgd_steps(gpu), three_sgd_steps("cpu"), three_sgd_steps("cpu", float64=True)
    assert on_gpu.keys() == on_cpu.keys() == exact.keys()
    assert {a.dtype for a in on_gpu.values()} == {np.dtype(np.float32)}
    worse = []
    for name, reference in exact.items():
        gpu_err, cpu_err = relative_error(on_gpu[name], reference), relative_error(on_cpu[name], reference)
        if gpu_err > 10 * cpu_err + 1e-5:
            worse.append(f"{name}: GPU off by {gpu_err:.2e}, CPU by {cpu_err:.2e}")
    assert not worse, f"{len(worse)} of {len(exact)} arrays:\n" + "\n".join(worse)
    # the first forward pass is well conditioned: there the two must agree closely
    np.testing.assert_allclose(on_gpu["step 0 logits"], on_cpu["step 0 logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(on_gpu["step 0 loss"], on_cpu["step 0 loss"], rtol=1e-5)


def resnet_and_sgd(device: str, seed: int) -> tuple[tinyres.nn.Module, optim.SGD]:
    tinyres.manual_seed(seed)
    model = models.cifar_resnet(20).to(device)
    return model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def one_step(model: tinyres.nn.Module, opt: optim.SGD, device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((8, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, 8)
    train_step(model, opt, tinyres.tensor(x, device=device), tinyres.tensor(y, device=device))


def momentum_buffers(opt: optim.SGD) -> dict[str, np.ndarray]:
    return {f"momentum {i}": s["momentum_buffer"] for i, s in opt.state_dict()["state"].items()}


@pytest.mark.gpu
def test_gpu_checkpoint_loads_on_the_cpu_and_back(gpu, tmp_path):
    model, opt = resnet_and_sgd(gpu, seed=0)
    one_step(model, opt, gpu, seed=1)
    saved = {**model.state_dict(), **momentum_buffers(opt)}
    save_checkpoint(tmp_path / "gpu.npz", model, opt, extra={"iteration": 1})

    cpu_model, cpu_opt = resnet_and_sgd("cpu", seed=5)  # other weights, no momentum yet
    assert load_checkpoint(tmp_path / "gpu.npz", cpu_model, cpu_opt) == {"iteration": 1}
    assert_same_state({**cpu_model.state_dict(), **momentum_buffers(cpu_opt)}, saved)
    save_checkpoint(tmp_path / "cpu.npz", cpu_model, cpu_opt)

    back, back_opt = resnet_and_sgd(gpu, seed=6)
    load_checkpoint(tmp_path / "cpu.npz", back, back_opt)
    assert_same_state({**back.state_dict(), **momentum_buffers(back_opt)}, saved)
    arrays = [p.data for p in back.parameters()] + list(back.buffers())
    arrays += [s["momentum_buffer"] for s in back_opt.state.values()]
    assert {device_of(a) for a in arrays} == {gpu}
    # training goes on from the loaded state exactly as from the original
    one_step(model, opt, gpu, seed=2)
    one_step(back, back_opt, gpu, seed=2)
    assert_same_state({**back.state_dict(), **momentum_buffers(back_opt)},
                      {**model.state_dict(), **momentum_buffers(opt)})


@pytest.mark.gpu
def test_gpu_matches_cpu_in_evaluate(gpu):
    data = synthetic_cifar(n_train=64, n_test=100, size=32)
    mean = per_pixel_mean(data.train_images).astype(np.float32)
    cpu_model, cpu_opt = resnet_and_sgd("cpu", seed=0)
    one_step(cpu_model, cpu_opt, "cpu", seed=1)  # running statistics that are not 0 and 1
    gpu_model = models.cifar_resnet(20)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(gpu)
    loss, err = evaluate(cpu_model, data.test_images, data.test_labels, mean, batch_size=64, device="cpu")
    gpu_loss, gpu_err = evaluate(gpu_model, data.test_images, data.test_labels, mean, batch_size=64, device=gpu)
    assert gpu_loss == pytest.approx(loss, rel=1e-5) and gpu_err == err


@pytest.mark.gpu
def test_gpu_training_resumes_exactly(gpu, tmp_path):
    """Ctrl-C at iteration 7 on the GPU, then resume: bit for bit the run that was never stopped."""
    data = synthetic_cifar()
    train(tiny_config(tmp_path / "whole", device=gpu), data=data)

    def press_ctrl_c(it: int, loss: float) -> None:
        if it == 7:
            os.kill(os.getpid(), signal.SIGINT)

    broken = tiny_config(tmp_path / "broken", device=gpu)
    with pytest.raises(KeyboardInterrupt, match="iteration 7"):
        train(broken, data=data, on_iteration=press_ctrl_c)
    assert train(tiny_config(tmp_path / "broken", device=gpu, resume=True), data=data)["iterations"] == 12
    assert json.loads((tmp_path / "broken" / "config.json").read_text())["device"] == gpu
    assert_same_state(final_state(tmp_path / "broken", broken), final_state(tmp_path / "whole", broken))
    strip = [{k: v for k, v in r.items() if k != "elapsed"} for r in read_metrics(tmp_path / "broken")]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed"} for r in read_metrics(tmp_path / "whole")]


def run_example(script: str, *args: str, cache: Path) -> str:
    """Run examples/`script` in a child process; return its stdout, failing with its stderr."""
    env = {k: v for k, v in child_env().items() if k != "TINYRES_DATA"}
    env["XDG_CACHE_HOME"] = str(cache)  # decoded data goes to the test's folder, not ~/.cache
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{script} {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done.stdout


def top_classes(stdout: str) -> list[list[tuple[str, float]]]:
    """(class, percent) pairs of each image line predict.py prints."""
    lines = [line.split(": ", 1)[1].split() for line in stdout.splitlines()[1:]]
    return [[(w[i], float(w[i + 1].rstrip("%"))) for i in range(0, len(w), 2)] for w in lines]


@pytest.mark.gpu
def test_gpu_examples_train_predict_and_plot(gpu, tmp_path, image_folder):
    pytest.importorskip("matplotlib")
    run, cache = tmp_path / "run", tmp_path / "cache"
    out = run_example("train_cifar.py", "--depth", "8", "--data", str(image_folder), "--batch-size", "8",
                      "--iters", "3", "--eval-every", "3", "--device", gpu, "--out", str(run), "--quiet", cache=cache)
    assert out.startswith("ResNet-8: 3 iterations")
    assert json.loads((run / "config.json").read_text())["device"] == gpu

    image = str(next((image_folder / "test" / "cat").iterdir()))
    on_gpu = top_classes(run_example("predict.py", str(run), image, "--device", gpu, cache=cache))
    on_cpu = top_classes(run_example("predict.py", str(run), image, "--device", "cpu", cache=cache))
    assert [c for c, _ in on_gpu[0]] == [c for c, _ in on_cpu[0]]
    assert [p for _, p in on_gpu[0]] == pytest.approx([p for _, p in on_cpu[0]], abs=0.11)  # printed to 0.1%

    fig = tmp_path / "fig7.png"
    out = run_example("layer_responses.py", str(run), "--data", str(image_folder), "--limit", "12",
                      "--device", gpu, "--out", str(fig), cache=cache)
    assert "ResNet-8: 7 layers" in out and fig.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
def test_gpu_example_reproduce(gpu, tmp_path, image_folder):
    pytest.importorskip("matplotlib")
    out = tmp_path / "repro"
    run_example("reproduce.py", "--nets", "plain-8", "resnet-8", "--iters", "2", "--batch-size", "8",
                "--data", str(image_folder), "--device", gpu, "--out", str(out), "--quiet", cache=tmp_path / "cache")
    table = (out / "results.md").read_text()
    assert "| plain-8 |" in table and "| ResNet-8 |" in table
    assert ("GPU: " if gpu == "cuda" else "CPU only") in table
    assert (out / "fig6.png").read_bytes()[:4] == b"\x89PNG"
