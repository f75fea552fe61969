"""The planner's objective: the mean task loss, language-modelling loss, or divergence from the original outputs over
held-out calibration batches."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


class Objective:
    """Mean loss over batches: task loss, LM loss, or divergence from the original outputs."""

    def __init__(self, model: nn.Module, batches: list[dict]) -> None:
        self.model = model
        self.batches = batches
        name = getattr(model, "_get_name", lambda: "")()
        if all("labels" in b for b in batches):
            self.kind = "task loss"
        elif name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and all("input_ids" in b for b in batches):
            self.kind = "language-modelling loss"
            for b in batches:
                labels = b["input_ids"].clone()
                if "attention_mask" in b:
                    labels[b["attention_mask"] == 0] = -100
                b["labels"] = labels
        else:
            self.kind = "output divergence"
            self.reference = [self._output(b) for b in batches]

    @torch.no_grad()
    def _output(self, batch: dict) -> torch.Tensor:
        out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
        first = out["logits"] if "logits" in out else out[0]
        return first.float()

    @torch.no_grad()
    def __call__(self, progress=None) -> float:
        total, weight = 0.0, 0
        for i, batch in enumerate(self.batches):
            n = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0]
            if self.kind != "output divergence":
                value = float(self.model(**batch).loss)
            else:
                out, ref = self._output(batch), self.reference[i]
                if out.shape[-1] <= 1024 and out.dim() == 2:  # classification logits: KL(original || merged)
                    value = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1),
                                                             log_target=True, reduction="batchmean"))
                else:
                    value = float((out - ref).square().sum() / ref.square().sum().clamp(min=1e-12))
            total, weight = total + value * n, weight + n
            if progress is not None:
                progress.update(1)
        return total / weight
