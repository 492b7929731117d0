"""tests/nn work on tiny tensors: intra-op threading only adds contention on the shared 2-core machine
(measured: the spectral-norm tests take ~55 s with 2 threads under load, ~8 s with 1). The thread count is
restored after this directory's tests."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
