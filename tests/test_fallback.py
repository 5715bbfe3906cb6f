"""Without the compiled extension the package warns once and runs on the "torch" backend."""
import os
import subprocess
import sys

SCRIPT = r'''
import sys, warnings
sys.modules["msplora_kernels._C"] = None          # makes `from . import _C` raise ImportError
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import msplora_kernels as mk
    import msplora_kernels.ops.functional  # noqa: F401  (a second import path must not warn again)
msgs = [str(w.message) for w in caught if "compiled extension is not available" in str(w.message)]
assert len(msgs) == 1, msgs
import torch
assert mk.available_backends("cpu")[0] == "torch", mk.available_backends("cpu")
x = torch.randn(3, 8)
layer = mk.MSPLoraLinear(8, 4, ranks=(2, 1))
torch.nn.init.normal_(layer.levels[0].B)
ref = mk.msplora_linear_reference(x, layer.weight, layer.bias, [l.A for l in layer.levels],
                                  [l.B for l in layer.levels], list(layer.scales))
torch.testing.assert_close(layer(x), ref)
try:
    mk.msplora_linear(x, layer.weight, layer.bias, [layer.levels[0].A], [layer.levels[0].B], [1.0], backend="cpp")
except RuntimeError as e:
    assert "the installed extension did not load" in str(e) and "available: ['torch'" in str(e), e
else:
    raise AssertionError("backend='cpp' ran without the extension")
print("ok")
'''


def test_warns_once_and_falls_back_to_torch():
    env_cmd = [sys.executable, "-c", SCRIPT]
    # The first-use build is off, so that nothing stands in for the extension made unloadable here.
    env = {**os.environ, "TRITON_INTERPRET": "0", "MSPLORA_FIRST_USE_BUILD": "0"}
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
