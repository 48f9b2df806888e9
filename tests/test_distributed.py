"""tinyres.distributed, DistributedDataParallel, SyncBatchNorm and the trainer under real `mpiexec -n 2`.

Each test starts real processes; they need mpi4py and an mpiexec (pip install -e '.[mpi]', which
CI installs) and skip without them. Every job has a time limit, so that a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinyres import distributed as dist
from tinyres.data import DataLoader
from tinyres.rundir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi_worker.py"
LIMIT = 30  # seconds: a job that has not ended by then hangs

# pip puts mpiexec beside the interpreter, which need not be on PATH
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))
try:
    import mpi4py  # noqa: F401
    MPI_MISSING = None if MPIEXEC else "no mpiexec on PATH or beside python (pip install -e '.[mpi]')"
except ImportError:
    MPI_MISSING = "mpi4py is not installed (pip install -e '.[mpi]')"
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=MPI_MISSING or "")


def environment() -> dict[str, str]:
    """This checkout's tinyres (and tests/) first on the path, one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["TINYRES_NUM_THREADS"] = "1"
    return env


def command(ranks: int, *args: str) -> list[str]:
    prefix = [MPIEXEC, "-n", str(ranks)] if ranks else []  # 0: one process without mpiexec
    return [*prefix, sys.executable, *map(str, args)]


def run(ranks: int, *args: str, limit: float = LIMIT) -> subprocess.CompletedProcess:
    """Run `args` under mpiexec -n `ranks` to the end, within `limit` seconds."""
    return subprocess.run(command(ranks, *args), env=environment(), cwd=ROOT, capture_output=True, text=True,
                          timeout=limit, check=False)


def train(ranks: int, out: Path, **settings) -> subprocess.CompletedProcess:
    done = run(ranks, WORKER, "train", out, json.dumps(settings))
    assert done.returncode == 0, done.stderr
    return done


def rows(out: Path, name: str = "train_log.jsonl") -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in read_jsonl(out / name)]


def assert_rows_close(got: list[dict], want: list[dict]) -> None:
    """The same logged iterations, with values equal to float32 rounding."""
    assert [r["iter"] for r in got] == [r["iter"] for r in want]
    for g, w in zip(got, want):
        for k, v in w.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (g["iter"], k)
            else:
                assert g[k] == v, (g["iter"], k)


# ---- without mpiexec -----------------------------------------------------------------------

def test_one_process_without_a_process_group():
    assert not dist.is_initialized() and dist.get_rank() == 0 and dist.get_world_size() == 1
    a = np.arange(3.0)
    assert dist.all_reduce(a) is a and dist.broadcast(a) is a
    np.testing.assert_array_equal(a, np.arange(3.0))


def test_the_core_does_not_import_mpi4py():
    code = ("import sys, tinyres, tinyres.train, tinyres.nn.parallel; "
            "print('mpi4py' in sys.modules, tinyres.distributed.get_world_size(), tinyres.distributed.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], env=environment(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.stdout.strip() == "False 1 False", done.stderr  # tinyres.distributed is there, as torch.distributed


def test_a_loader_split_gives_each_rank_its_part_of_every_batch():
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(40) % 10

    def first_batches(**kw):
        loader = DataLoader(images, labels, batch_size=8, augment=True, seed=3, **kw)
        return [b for _, b in zip(range(6), loader.stream())]
    whole = first_batches()
    parts = [first_batches(num_replicas=2, rank=r) for r in range(2)]
    for i, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[0][i][0], parts[1][i][0]]), x)
        np.testing.assert_array_equal(np.concatenate([parts[0][i][1], parts[1][i][1]]), y)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        DataLoader(images, labels, batch_size=8, num_replicas=3, rank=0)


def test_batch_norm_through_the_all_sum_hook_has_the_gradient_of_its_math():
    """One process's all_sum is the identity: the pooled float64 moments and the summed backward in float64."""
    from tinyres import gradcheck, tensor
    from tinyres.nn import functional as F
    rng = np.random.default_rng(0)
    x, gamma, beta = (tensor(a, dtype=np.float64, requires_grad=True)
                      for a in (rng.normal(3, 2, (4, 3, 2, 2)), rng.normal(1, 0.3, 3), rng.normal(0, 1, 3)))
    assert gradcheck(lambda *t: F.batch_norm(*t[:1], None, None, *t[1:], training=True, all_sum=lambda a: a),
                     [x, gamma, beta])
    plain = F.batch_norm(x, None, None, gamma, beta, training=True).numpy()
    np.testing.assert_allclose(F.batch_norm(x, None, None, gamma, beta, training=True, all_sum=lambda a: a).numpy(),
                               plain, rtol=1e-12, atol=1e-12)


def test_convert_sync_batchnorm_keeps_the_parameters_and_the_checkpoint():
    from tinyres import models, nn
    from tinyres.nn import init
    init.manual_seed(0)
    model = models.cifar_resnet(20)
    before = model.state_dict()
    params = [id(p) for p in model.parameters()]
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 19
    assert [id(p) for p in model.parameters()] == params
    ddp = nn.parallel.DistributedDataParallel(model)
    assert list(ddp.state_dict()) == list(before)  # no 'module.' prefix: the files of one process


def each_rank_says(tmp_path: Path, code: str, env: dict | None = None) -> list[str]:
    """What `code` leaves in `said` on each of 2 ranks (a file each: their printed lines could interleave)."""
    code = f"import sys, pathlib; said = ''\n{code}\npathlib.Path(sys.argv[1], str(d.get_rank())).write_text(said)"
    done = subprocess.run(command(2, "-c", code, tmp_path), env=env or environment(), cwd=ROOT, capture_output=True,
                          text=True, timeout=LIMIT, check=False)
    assert done.returncode == 0, done.stderr
    return [(tmp_path / str(r)).read_text() for r in range(2)]


@needs_mpi
def test_all_reduce_and_broadcast_across_two_ranks(tmp_path):
    code = ("import numpy as np, tinyres; from tinyres import distributed as d; d.init_process_group()\n"
            "r = d.get_rank(); t = tinyres.tensor([1.0, 2.0 + r]); d.all_reduce(t)\n"
            "m = np.array([r, -r]); d.all_reduce(m, d.ReduceOp.MAX)\n"
            "b = np.full((2, 2), float(r))[:, :1]; d.broadcast(b, src=1)\n"  # a view that is not contiguous
            "said = f'{t.tolist()} {m.tolist()} {b.ravel().tolist()} {d.get_world_size()}'")
    assert each_rank_says(tmp_path, code) == ["[2.0, 5.0] [1, 0] [1.0, 1.0] 2"] * 2


# ---- equivalence: K ranks of 16/K images against one process of 16 ---------------------------

def compare(path: Path, skip: str = "\0") -> None:
    saved = np.load(path)
    names = [k.split("/", 1)[1] for k in saved if k.startswith("ranks/") and skip not in k]
    assert len(names) > 3 * 65, names  # the loss, 3 steps' gradients of ResNet-20's 65 parameters, its state
    for name in names:
        got, want = saved[f"ranks/{name}"], saved[f"one/{name}"]
        scale = float(np.abs(want).max()) or 1.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@needs_mpi
def test_sync_batchnorm_over_2_ranks_computes_what_one_process_computes(tmp_path):
    """Loss, every gradient, parameters and running statistics after 3 SGD steps of ResNet-20."""
    done = run(2, WORKER, "sync", tmp_path / "sync.npz")
    assert done.returncode == 0, done.stderr
    compare(tmp_path / "sync.npz")


@needs_mpi
def test_per_rank_batchnorm_matches_one_process_normalizing_each_half_alone(tmp_path):
    done = run(2, WORKER, "per-rank", tmp_path / "per-rank.npz")
    assert done.returncode == 0, done.stderr
    compare(tmp_path / "per-rank.npz")


@needs_mpi
@pytest.mark.slow
@pytest.mark.real_data
def test_two_ranks_follow_one_process_for_20_float64_steps_on_real_batches(tmp_path, real_archive):
    """In float32, SGD at lr 0.1 amplifies rounding until runs of another summation order part (one
    process on one thread and on two does too); in float64 two ranks stay on one process's path."""
    settings = json.dumps({"data": str(real_archive), "steps": 20})
    for ranks in (0, 2):
        done = run(ranks, WORKER, "float64", tmp_path / f"{ranks}.npy", settings, limit=300)
        assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "2.npy"), np.load(tmp_path / "0.npy"), rtol=1e-10)


# ---- the trainer ---------------------------------------------------------------------------

@needs_mpi
def test_two_ranks_log_what_one_process_logs_and_only_rank_0_writes(tmp_path):
    train(0, tmp_path / "one", iters=6, eval_every=3)
    done = train(2, tmp_path / "two", iters=6, eval_every=3)
    assert done.stdout.count("done 6") == 1  # rank 0 alone reports
    assert_rows_close(rows(tmp_path / "two"), rows(tmp_path / "one"))  # two writers would double every row
    assert_rows_close(rows(tmp_path / "two", "metrics.jsonl"), rows(tmp_path / "one", "metrics.jsonl"))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@needs_mpi
@pytest.mark.parametrize("first, then", [(0, 2), (2, 1)])
def test_resume_with_another_number_of_ranks(tmp_path, first, then):
    """A checkpoint of one process resumes on two ranks, and the reverse, as if never stopped."""
    train(0, tmp_path / "straight", iters=8, eval_every=4)
    train(first, tmp_path / "run", iters=4, eval_every=4)
    train(then, tmp_path / "run", iters=8, eval_every=4, resume=True)
    assert_rows_close(rows(tmp_path / "run"), rows(tmp_path / "straight"))
    assert_rows_close(rows(tmp_path / "run", "metrics.jsonl"), rows(tmp_path / "straight", "metrics.jsonl"))


# ---- faults --------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_with_a_clear_error(tmp_path, how):
    start = time.monotonic()
    done = run(2, WORKER, "train", tmp_path / "run", json.dumps({"iters": 10_000, "fail_at": [1, 3, how]}))
    assert time.monotonic() - start < LIMIT
    assert done.returncode != 0
    if how == "raise":
        assert "a fault on purpose at iteration 3" in done.stderr
        assert "rank 1 of 2: RuntimeError on rank 1; stopping all ranks" in done.stderr


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, children first (read from /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in descendants(c)]


@needs_mpi
@pytest.mark.parametrize("to", ["mpiexec", "one rank"])
def test_sigterm_saves_one_checkpoint_and_resume_finishes(tmp_path, image_folder, to):
    out, script = tmp_path / "run", ROOT / "examples" / "train_cifar.py"
    flags = ["--data", image_folder, "--batch-size", "8", "--out", out]
    job = subprocess.Popen(command(2, script, *flags, "--iters", "10000", "--milestones"), env=environment(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stderr:  # rank 0's progress: a line at iteration 10
            if line.startswith("iter 10/"):
                break
        if to == "mpiexec":  # which forwards it to every rank
            job.send_signal(signal.SIGTERM)
        else:  # the others hear of it in the next iteration
            ranks = [p for p in descendants(job.pid) if "train_cifar.py" in Path(f"/proc/{p}/cmdline").read_text()]
            assert len(ranks) == 2
            os.kill(ranks[-1], signal.SIGTERM)
        try:
            _, stderr = job.communicate(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            job.kill()
            pytest.fail(f"the job did not stop within {LIMIT} s of SIGTERM:\n{job.communicate()[1]}")
    finally:
        job.kill()
    assert job.returncode == 128 + signal.SIGTERM, stderr
    stopped = int(re.search(r"(SIGTERM|another rank): interrupted at iteration (\d+)", stderr).group(2))
    assert stopped >= 10
    if to == "one rank":
        assert f"SIGTERM to another rank: interrupted at iteration {stopped}" in stderr
    assert (out / "checkpoint.npz").exists() and not (out / "checkpoint-prev.npz").exists()  # one checkpoint
    done = run(2, script, *flags, "--iters", str(stopped + 2), "--resume")
    assert done.returncode == 0, done.stderr
    assert f"ResNet-20: {stopped + 2} iterations" in done.stdout


@needs_mpi
def test_the_ranks_on_a_machine_share_its_cores(tmp_path):
    code = ("sys.path.insert(0, 'examples'); import cli, tinyres; cli.join_mpi_job()\n"
            "from tinyres import distributed as d; said = f'{d.get_local_world_size()} {tinyres.get_num_threads()}'")
    env = {k: v for k, v in environment().items() if k != "TINYRES_NUM_THREADS"}
    cores = len(os.sched_getaffinity(0))
    assert each_rank_says(tmp_path, code, env) == [f"2 {max(1, cores // 2)}"] * 2


@needs_mpi
def test_a_batch_that_does_not_split_evenly_is_refused_before_any_work(tmp_path):
    done = run(3, ROOT / "examples" / "train_cifar.py", "--batch-size", "16", "--data", tmp_path / "none",
               "--out", tmp_path / "run")
    assert done.returncode == 2
    assert "--batch-size 16 cannot be split evenly over the 3 processes" in done.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_reproduce_under_mpiexec_prints_and_writes_once(tmp_path, image_folder):
    pytest.importorskip("matplotlib")
    done = run(2, ROOT / "examples" / "reproduce.py", "--nets", "resnet-20", "--iters", "4", "--batch-size", "8",
               "--data", image_folder, "--out", tmp_path, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("# CIFAR-10") == 1 and done.stderr.count("== ResNet-20") == 1
    assert len(read_jsonl(tmp_path / "resnet-20" / "metrics.jsonl")) == 1
    assert (tmp_path / "results.md").exists() and (tmp_path / "fig6.png").exists()
