"""Deployment: a converted model trains under DistributedDataParallel (gloo, 2 CPU processes) and compiles."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lcnnify import lcnnify, param_groups
from lcnnify.testing.models import TinyCNN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank
    model = lcnnify(TinyCNN(), example_inputs=torch.randn(1, 1, 8, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y) + model.curvature_penalty()
        loss.backward()
        opt.step()
    out[rank] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def test_ddp_training_keeps_ranks_in_sync():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
        s0, s1 = dict(out[0]), dict(out[1])
    assert s0.keys() == s1.keys()
    params = [k for k in s0 if "log_beta" in k or "log_gamma" in k or k.endswith("original")]
    assert params
    for k in params:  # gradients were all-reduced: every rank holds the same parameters
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = lcnnify(TinyCNN(), example_inputs=torch.randn(1, 1, 8, 8)).eval()
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
