"""Writers refuse an adapter whose tensors are not whole (msplora_kernels/models/full_tensors.py):
a sharded or offloaded parameter that no known engine gathered is an error, never an empty or
partial tensor in a file. The real engines are in test_distributed.py."""
import pytest
import torch

import msplora_kernels as mk
from models import tiny_llama
from msplora_kernels import IncompleteAdapterError


def _adapted():
    model = tiny_llama()
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=(8, 4, 2)))
    return model


def _shard_one_factor(model):
    """What ZeRO-3 leaves on a rank before a gather: the parameter itself empty."""
    name, p = next((k, v) for k, v in mk.adapter_state_dict(model).items() if k.endswith(".A"))
    p.data = torch.empty(0, dtype=p.dtype)
    return name


def test_save_refuses_an_empty_factor_and_writes_nothing(tmp_path):
    model = _adapted()
    name = _shard_one_factor(model)
    with pytest.raises(IncompleteAdapterError, match=rf"save_adapter: refusing .*{name}: \(0,\) where the adapter needs"):
        mk.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_export_refuses_it_too(tmp_path):
    pytest.importorskip("peft")
    model = _adapted()
    _shard_one_factor(model)
    with pytest.raises(IncompleteAdapterError, match="export_peft: refusing"):
        mk.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_whole_adapter_saves_as_before(tmp_path):
    model = _adapted()
    mk.save_adapter(model, tmp_path / "adapter")
    loaded = mk.load_msplora(tiny_llama(), tmp_path / "adapter")
    for (k, a), (_, b) in zip(mk.adapter_state_dict(model).items(), mk.adapter_state_dict(loaded).items()):
        assert a.shape == b.shape and torch.equal(a, b), k


def test_merge_refuses_sharded_parameters():
    model = _adapted()
    layer = next(layer for _, layer in mk.adapted_layers(model))
    layer.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks its parameters
    with pytest.raises(ValueError, match="merge_and_unload: 1 adapted layer.* sharded parameters"):
        mk.merge_and_unload(model)
    with pytest.raises(ValueError, match="merge_adapter: 1 adapted layer"):
        mk.merge_adapter(model)
