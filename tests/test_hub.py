"""Adapters on the Hub, offline: a repo id resolved from a Hub cache laid out by the test (at two
revisions), and an upload through a stand-in for the Hub client."""
import shutil
from pathlib import Path

import pytest
import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_bert, tokens

pytest.importorskip("huggingface_hub")
REPO = "someone/tiny-bert-msplora"


def adapted(seed):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(modules_to_save=["classifier"]))
    torch.manual_seed(seed)
    randomize_adapter(model)
    return model


def lay_out_cache(cache: Path, repo: str, revisions: dict) -> None:
    """The Hub cache's layout: models--org--name/{refs/<name>, snapshots/<commit>/<files>}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for i, (ref, folder) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        snapshot = root / "snapshots" / commit
        shutil.copytree(folder, snapshot)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


def test_load_by_repo_id_and_revision_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = {"main": adapted(1), "v1": adapted(2)}
    for ref, model in models.items():
        mk.save_adapter(model, tmp_path / ref)
    lay_out_cache(tmp_path / "hub", REPO, {ref: tmp_path / ref for ref in models})
    ids = tokens()
    for ref, model in models.items():
        loaded = mk.load_msplora(tiny_bert(), REPO, revision=None if ref == "main" else ref, cache_dir=tmp_path / "hub")
        assert torch.equal(loaded(ids).logits, model(ids).logits), ref
    assert not torch.equal(models["main"](ids).logits, models["v1"](ids).logits)


def test_a_repo_missing_from_the_offline_cache_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_bert()
    with pytest.raises(FileNotFoundError, match=r"could not get the adapter someone/absent \(revision main\) from the Hub"):
        mk.load_msplora(base, "someone/absent", cache_dir=tmp_path / "hub")
    assert not hasattr(base, "msplora_factors")
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        mk.load_msplora(base, str(tmp_path / "no" / "such" / "folder"))


class StandInHub:
    """Records what push_to_hub asks of huggingface_hub.HfApi and keeps a copy of the upload."""

    def __init__(self, store: Path):
        self.store, self.calls = store, []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, repo_type=None):
        self.calls.append(("upload_folder", repo_id, revision, commit_message, repo_type))
        shutil.copytree(folder_path, self.store / repo_id)


def test_push_uploads_the_adapter_and_a_model_card(tmp_path):
    model, hub = adapted(3), StandInHub(tmp_path)
    url = mk.push_to_hub(model, REPO, private=True, base_model="bert-base-uncased", api=hub)
    assert url == f"https://huggingface.co/{REPO}"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][2:4] == (True, True)
    uploaded = tmp_path / REPO
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert "library_name: msplora-kernels" in card and "base_model: bert-base-uncased" in card
    assert f'mk.load_msplora(base, "{REPO}")' in card and "BertForSequenceClassification.from_pretrained" in card
    loaded = mk.load_msplora(tiny_bert(), uploaded)
    ids = tokens()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="repo_id must look like 'org/name'"):
        mk.push_to_hub(model, "no-slash", api=hub)
