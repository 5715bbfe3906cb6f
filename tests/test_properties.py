"""Property tests: random shapes, levels, ranks, dtypes, strides and dropout, every CPU backend
against the reference. The example count is bounded so CI stays fast."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem

BACKENDS = mk.available_backends("cpu")
DTYPES = {"triton": [torch.float32, torch.float16]}  # the interpreter miscomputes bf16 tl.dot
DEFAULT_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(DTYPES.get(backend, DEFAULT_DTYPES)))
    levels = draw(st.integers(1, 4))
    return dict(
        backend=backend,
        dtype=dtype,
        ranks=tuple(draw(st.lists(st.integers(1, 9), min_size=levels, max_size=levels))),
        lead=tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))),
        in_f=draw(st.integers(1, 40)),
        out_f=draw(st.integers(1, 40)),
        bias=draw(st.booleans()),
        noncontig=draw(st.booleans()),
        p=draw(st.sampled_from([0.0, 0.0, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_every_backend_matches_reference(case):
    torch.manual_seed(case["seed"])
    problem = make_problem(case["lead"], case["in_f"], case["out_f"], case["ranks"], case["dtype"],
                           bias=case["bias"], noncontig=case["noncontig"])
    check_backend_against_reference(case["backend"], problem, dropout_p=case["p"], training=case["p"] > 0,
                                    rng_seed=case["seed"])
