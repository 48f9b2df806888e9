"""Programs that tests/test_distributed.py runs under `mpiexec -n K`: python tests/mpi_worker.py <job> <out>."""

from __future__ import annotations

import sys

import numpy as np

from tinyres import distributed as dist
from tinyres import models, nn, optim
from tinyres.nn import init
from tinyres.run import train_step
from tinyres.tensor import tensor

STEPS = 3


def batches(n: int = 16, size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """STEPS global batches of n images (N, 3, size, size), the same on every rank."""
    rng = np.random.default_rng(0)
    return [(rng.normal(0.5, 1.0, (n, 3, size, size)).astype(np.float32), rng.integers(0, 10, n))
            for _ in range(STEPS)]


def resnet20() -> nn.Module:
    init.manual_seed(0)
    return models.cifar_resnet(20)


def sgd(model: nn.Module) -> optim.SGD:
    return optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def record(model: nn.Module, losses: list[float], grads: list[dict]) -> dict[str, np.ndarray]:
    out = {"loss": np.array(losses)}
    for step, g in enumerate(grads):
        out.update({f"grad{step}/{k}": v for k, v in g.items()})
    out.update({f"state/{k}": v for k, v in model.state_dict().items()})
    return out


def grads_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: p.grad.numpy().copy() for name, p in model.named_parameters()}


def one_process(halves: int) -> dict[str, np.ndarray]:
    """STEPS SGD steps of one process on the whole batches; each batch normalized in `halves` parts alone."""
    model, losses, grads = resnet20(), [], []
    opt = sgd(model)
    for x, y in batches():
        parts = [(tensor(xs), tensor(ys)) for xs, ys in zip(np.split(x, halves), np.split(y, halves))]
        opt.zero_grad()
        loss, kept = 0, None
        for xs, ys in parts:
            loss = loss + nn.functional.cross_entropy(model(xs), ys) * (1 / halves)
            kept = kept or [b.copy() for b in model.buffers()]  # the running statistics of the first part
        for b, first in zip(model.buffers(), kept):  # are those that rank 0 gives all ranks
            b[...] = first
        loss.backward()
        opt.step()
        losses.append(loss.item())
        grads.append(grads_of(model))
    return record(model, losses, grads)


def ranks(sync_bn: bool) -> dict[str, np.ndarray]:
    """The same steps over the ranks of this job, each on its part of every batch."""
    k, r = dist.get_world_size(), dist.get_rank()
    module = resnet20()
    if sync_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    model = nn.parallel.DistributedDataParallel(module)
    opt = sgd(model)
    losses, grads = [], []
    for x, y in batches():
        xs, ys = np.split(x, k)[r], np.split(y, k)[r]
        loss, _ = train_step(model, opt, tensor(xs), tensor(ys))
        losses.append(float(dist.all_reduce(np.array([float(loss)]))[0] / k))
        grads.append(grads_of(module))
    return record(module, losses, grads)


def train_run(out: str, settings: str) -> None:
    """`train` a small ResNet-20 on synthetic 8x8 images with TrainConfig(**settings) (JSON); 'fail_at':
    [rank, iteration, how] makes that rank raise, or kill itself, after that iteration."""
    import json
    import os
    import signal

    from test_train import synthetic_cifar

    from tinyres.train import TrainConfig, train
    kw = json.loads(settings)
    fail_rank, fail_it, how = kw.pop("fail_at", (-1, 0, ""))

    def on_iteration(it: int, loss: float) -> None:
        if dist.get_rank() == fail_rank and it == fail_it:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"a fault on purpose at iteration {it}")
    config = TrainConfig(out=out, batch_size=16, lr=0.02, milestones=(), log_every=1, progress=False, **kw)
    result = train(config, data=synthetic_cifar(256, 64), on_iteration=on_iteration)
    if dist.get_rank() == 0:
        print(f"done {result['iterations']} test_err {result['test_err']}", flush=True)


def float64_losses(out: str, settings: str) -> None:
    """{"data": archive, "steps": n}: the mean loss of each of n float64 steps of ResNet-20 on the trainer's
    real batches (augmented, this rank's part of each), with SyncBatchNorm and DDP over the ranks."""
    import json

    from tinyres.data import DataLoader, load_cifar10, per_pixel_mean
    kw = json.loads(settings)
    k, r = dist.get_world_size(), dist.get_rank()
    data = load_cifar10(kw["data"])
    loader = DataLoader(data.train_images, np.asarray(data.train_labels), batch_size=128, drop_last=True,
                        augment=True, mean=per_pixel_mean(data.train_images).astype(np.float32), num_replicas=k,
                        rank=r)
    model = resnet20().double()
    if k > 1:
        model = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    opt, losses = sgd(model), []
    for (x, y), _ in zip(loader.stream(), range(kw["steps"])):
        loss, _ = train_step(model, opt, tensor(x.astype(np.float64)), tensor(y))
        losses.append(float(dist.all_reduce(np.array([float(loss)]))[0] / k))
    if r == 0:
        np.save(out, np.array(losses))


def main(job: str, out: str, settings: str = "{}") -> None:
    if dist.launched_by_mpiexec():
        dist.init_process_group()
    if job == "train":
        train_run(out, settings)
    elif job == "float64":
        float64_losses(out, settings)
    elif job in ("sync", "per-rank"):
        got = ranks(sync_bn=job == "sync")
        if dist.get_rank() == 0:
            want = one_process(1 if job == "sync" else dist.get_world_size())
            np.savez(out, **{f"ranks/{k}": v for k, v in got.items()}, **{f"one/{k}": v for k, v in want.items()})
    else:
        raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
