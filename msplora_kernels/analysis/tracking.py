"""Singular values over training (paper Fig. 3): a recorder for custom loops and a Trainer callback."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.callbacks import trainer_callback_base
from .spectra import pairs_from_model


class SpectrumRecorder:
    """Records the top-k singular values of every factor pair, tagged by level, at each call."""

    def __init__(self, top_k: int = 8):
        self.top_k = top_k
        self.steps: list[int] = []
        self.values: dict[str, dict] = {}   # factor name -> {"level", "target", "series": [[sigma...], ...]}

    @torch.no_grad()
    def record(self, model, step: int) -> None:
        self.steps.append(int(step))
        for pair in pairs_from_model(model):
            sigma = pair.singular_values()[: self.top_k]
            padded = torch.zeros(self.top_k, dtype=torch.float64)
            padded[: len(sigma)] = sigma
            entry = self.values.setdefault(pair.name, {"level": pair.level, "target": pair.target, "series": []})
            entry["series"].append(padded.tolist())

    def level_matrix(self, level: int) -> torch.Tensor:
        """(top_k x time) mean over the level's factor pairs: one heatmap of the figure."""
        series = [torch.tensor(v["series"]) for v in self.values.values() if v["level"] == level]
        return torch.stack(series).mean(0).T if series else torch.zeros(self.top_k, len(self.steps))

    def levels(self) -> list[int]:
        return sorted({v["level"] for v in self.values.values()})

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "steps": self.steps, "factors": self.values}

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path) -> "SpectrumRecorder":
        data = json.loads(Path(path).read_text())
        rec = cls(data["top_k"])
        rec.steps, rec.values = data["steps"], data["factors"]
        return rec


class MSPLoraSpectrumCallback(trainer_callback_base()):
    """A transformers.TrainerCallback that records spectra every `every_steps` steps and at each epoch end."""

    def __init__(self, recorder: SpectrumRecorder | None = None, every_steps: int = 0):
        self.recorder = recorder or SpectrumRecorder()
        self.every_steps = every_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and model is not None and state.global_step % self.every_steps == 0:
            self.recorder.record(model, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (not self.recorder.steps or self.recorder.steps[-1] != state.global_step):
            self.recorder.record(model, state.global_step)
