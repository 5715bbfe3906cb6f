import os

import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which must
# be on before triton decorates any kernel. With a GPU they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, repeatable from the test's id.
    torch.manual_seed(sum(map(ord, request.node.nodeid)) * 7919 % (2**31))
    yield
