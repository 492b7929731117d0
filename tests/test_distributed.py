"""Deployment: a converted model trains under DistributedDataParallel (gloo, 2 CPU processes) and compiles;
a converted SyncBatchNorm reduces its statistics across the processes."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lcnnify import lcnnify, param_groups
from lcnnify.nn import LipschitzBatchNorm
from lcnnify.testing.models import TinyCNN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    """Both distributed workloads in one pair of processes (their start-up dominates the cost)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out[rank] = {"ddp": _ddp_train(rank), "sync": _sync_checks(rank)}
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results() -> tuple[dict, dict]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
        return dict(out[0]), dict(out[1])


def _ddp_train(rank: int) -> dict:
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
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ddp_training_keeps_ranks_in_sync(distributed_results):
    s0, s1 = distributed_results[0]["ddp"], distributed_results[1]["ddp"]
    assert s0.keys() == s1.keys()
    params = [k for k in s0 if "log_beta" in k or "log_gamma" in k or k.endswith("original")]
    assert params
    for k in params:  # gradients were all-reduced: every rank holds the same parameters
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-5, atol=1e-6)


#: (shape of the whole batch, rank 0's share, affine, momentum, input scale per rank): unequal shares and
#: scales, so local statistics differ from the global ones; gamma 1.5 keeps the clip active
SYNC_CASES = [((8, 3, 4, 4), 3, True, 0.1, (0.05, 1.0)), ((9, 5), 4, False, None, (1.0, 0.02)),
              ((6, 2, 3), 0, True, 0.3, (1.0, 1.0))]


def _sync_case_data(case: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape, n0, _, _, scales = SYNC_CASES[case]
    g = torch.Generator().manual_seed(10 + case)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5
    x[:n0] *= scales[0]
    x[n0:] *= scales[1]
    return x, torch.randn(*shape, generator=g, dtype=torch.float64)  # input, output weights of the loss


def _sync_layer(case: int) -> LipschitzBatchNorm:
    shape, _, affine, momentum, _ = SYNC_CASES[case]
    sbn = torch.nn.SyncBatchNorm(shape[1], momentum=momentum, affine=affine).double()
    lbn = LipschitzBatchNorm.from_batchnorm(sbn, gamma=1.5)
    if affine:
        with torch.no_grad():
            lbn.weight.copy_(torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64))
            lbn.bias.copy_(torch.linspace(-1.0, 1.0, shape[1], dtype=torch.float64))
    return lbn


def _params(lbn: LipschitzBatchNorm) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in lbn.named_parameters()}


def _sync_checks(rank: int) -> dict:
    result = {}
    for case in range(len(SYNC_CASES)):
        x, gy = _sync_case_data(case)
        n0 = SYNC_CASES[case][1]
        sl = slice(0, n0) if rank == 0 else slice(n0, None)
        lbn = _sync_layer(case).train()
        steps = []
        for step in range(2):  # two steps: the second one starts from updated running statistics
            xr = (x[sl] * (1 + step)).clone().requires_grad_(True)
            lbn.zero_grad()
            y = lbn(xr)
            (y * gy[sl]).sum().backward()
            steps.append({"y": y.detach(), "grad_x": xr.grad,
                          **{f"grad_{k}": p.grad for k, p in _params(lbn).items()}})
        lbn.eval()
        result[case] = {"steps": steps, "running_mean": lbn.running_mean, "running_var": lbn.running_var,
                        "eval_y": lbn(x[sl]).detach()}
    # a group of one rank: local statistics (no collective is issued)
    solo = dist.new_group([0])
    if rank == 0:
        x, _ = _sync_case_data(0)
        a, b = _sync_layer(0), _sync_layer(0)
        a.process_group, b.synchronized = solo, False
        result["solo_equal"] = torch.equal(a(x[:3]), b(x[:3]))
    # end to end: lcnnify keeps a SyncBatchNorm synchronized
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.SyncBatchNorm(2))
    conv = lcnnify(model, example_inputs=torch.randn(2, 1, 5, 5))
    result["converted_synchronized"] = [m.synchronized for m in conv.modules() if isinstance(m, LipschitzBatchNorm)]
    return result


def _reference_steps(case: int) -> tuple[list[dict], LipschitzBatchNorm]:
    """The same two steps on the concatenated batch in one process (an unsynchronized layer)."""
    x, gy = _sync_case_data(case)
    ref = _sync_layer(case)
    ref.synchronized = False
    steps = []
    for step in range(2):
        xr = (x * (1 + step)).clone().requires_grad_(True)
        ref.zero_grad()
        y = ref(xr)
        (y * gy).sum().backward()
        steps.append({"y": y.detach(), "grad_x": xr.grad, **{f"grad_{k}": p.grad for k, p in _params(ref).items()}})
    return steps, ref.eval()


def test_synchronized_lipschitz_batchnorm_matches_the_concatenated_batch(distributed_results):
    r0, r1 = distributed_results[0]["sync"], distributed_results[1]["sync"]
    close = dict(rtol=1e-10, atol=1e-12)
    for case in range(len(SYNC_CASES)):
        n0 = SYNC_CASES[case][1]
        ref_steps, ref = _reference_steps(case)
        for step, want in enumerate(ref_steps):
            got0, got1 = r0[case]["steps"][step], r1[case]["steps"][step]
            for key in ("y", "grad_x"):  # each rank holds its slice of the global result
                torch.testing.assert_close(torch.cat([got0[key], got1[key]]), want[key], **close)
            for key in want:  # parameter gradients: each rank's part of the summed loss
                if key.startswith("grad_") and key != "grad_x":
                    torch.testing.assert_close(got0[key] + got1[key], want[key], **close)
        assert ref_steps[0]["grad_log_gamma_minus_1"].abs().item() > 0  # the clip was active
        for r in (r0, r1):
            torch.testing.assert_close(r[case]["running_mean"], ref.running_mean, **close)
            torch.testing.assert_close(r[case]["running_var"], ref.running_var, **close)
        x, _ = _sync_case_data(case)
        with torch.no_grad():  # eval: running statistics, no collective
            torch.testing.assert_close(r0[case]["eval_y"], ref(x[:n0]), **close)
            torch.testing.assert_close(r1[case]["eval_y"], ref(x[n0:]), **close)
    assert r0["solo_equal"]
    assert r0["converted_synchronized"] == r1["converted_synchronized"] == [True]


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = lcnnify(TinyCNN(), example_inputs=torch.randn(1, 1, 8, 8)).eval()
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
