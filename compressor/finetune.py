"""Brief fine-tuning by distillation from the original model, and evaluation.

Loss per batch (Hinton et al. distillation; T the temperature)::

    L = T^2 * KL(softmax(teacher / T) || softmax(student / T))  [+ cross-entropy(student, y) if labels]

Optimiser: Adam, no weight decay (the thesis applies none to ACDC's A and D; the paper keeps
alpha out of it), cosine learning-rate decay over the budget. The new structured layers train at
``lr``; the layers fixclf kept (convolutions, excluded Linears) are already trained and move at
``lr * kept_lr_scale`` so that the large step the new layers need does not undo them. The run stops at ``epochs`` or
``max_time`` seconds, whichever first. The held-out score (accuracy with labels, else
distillation loss) is reported per epoch but never used to pick a state: it is the figure the
report quotes, so selecting on it would overstate accuracy.

Guards: a non-finite loss stops the run, restores the last finite state (end of the last
complete epoch, or the initialisation) and raises :class:`TrainingError`; Ctrl-C does the same
and raises :class:`Interrupted`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .errors import Interrupted, TrainingError
from .layers import FixedHead, StructuredLinear

__all__ = ["FinetuneConfig", "FinetuneResult", "EpochStats", "evaluate", "distill"]


@dataclass
class FinetuneConfig:
    epochs: int = 40
    max_time: float | None = None  # seconds
    lr: float = 2e-2
    batch_size: int = 64
    temperature: float = 2.0
    seed: int = 0
    device: str = "cpu"
    kept_lr_scale: float = 0.05  # layers fixclf did not replace are already trained: smaller steps


@dataclass
class EpochStats:
    epoch: int
    loss: float
    score: float  # held-out accuracy, or -distillation loss without labels
    seconds: float


@dataclass
class FinetuneResult:
    epochs: list[EpochStats] = field(default_factory=list)
    stopped_by: str = "epochs"


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y)."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == y[start : start + batch_size]).sum())
    return correct / max(1, x.shape[0])


@torch.no_grad()
def _distill_loss_on(student: nn.Module, teacher: nn.Module, x: torch.Tensor, t: float, device: str) -> float:
    student.eval()
    return float(_kd(student(x.to(device)), teacher(x.to(device)), t))


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1), log_target=True, reduction="batchmean") * t * t


def _score(student: nn.Module, teacher: nn.Module, data: Dataset, config: FinetuneConfig) -> float:
    if data.has_labels:
        return evaluate(student, data.x_val, data.y_val, device=config.device)
    return -_distill_loss_on(student, teacher, data.x_val, config.temperature, config.device)


def _param_groups(student: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Structured layers and fixed heads train at ``lr``; every other parameter at ``lr * kept_lr_scale``."""
    new = {id(p) for m in student.modules() if isinstance(m, (StructuredLinear, FixedHead)) for p in m.parameters()}
    fresh = [p for p in student.parameters() if id(p) in new]
    kept = [p for p in student.parameters() if id(p) not in new]
    groups = [{"params": fresh, "lr": config.lr}]
    if kept:
        groups.append({"params": kept, "lr": config.lr * config.kept_lr_scale})
    return groups


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    config: FinetuneConfig,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` in place towards ``teacher`` on ``data.x_train``; returns the history.

    ``on_step(epoch, step, loss)`` and ``on_epoch(stats)`` report progress (the CLI draws bars).
    """
    device = config.device
    student.to(device)
    teacher.to(device).eval()
    generator = torch.Generator().manual_seed(config.seed)
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    optimiser = torch.optim.Adam(_param_groups(student, config), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, config.epochs * steps_per_epoch))
    result = FinetuneResult()
    last_good = copy.deepcopy(student.state_dict())
    start = time.monotonic()
    try:
        for epoch in range(1, config.epochs + 1):
            student.train()
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                x = data.x_train[idx].to(device)
                with torch.no_grad():
                    target = teacher(x)
                logits = student(x)
                loss = _kd(logits, target, config.temperature)
                if data.y_train is not None:
                    loss = loss + F.cross_entropy(logits, data.y_train[idx].to(device))
                if not torch.isfinite(loss):
                    student.load_state_dict(last_good)
                    raise TrainingError(
                        f"fine-tuning diverged (loss {float(loss)}) in epoch {epoch}; restored the state after epoch "
                        f"{epoch - 1} and wrote nothing; lower --lr"
                    )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                scheduler.step()
                total += loss.item()
                if on_step:
                    on_step(epoch, step, loss.item())
            score = _score(student, teacher, data, config)
            stats = EpochStats(epoch, total / steps_per_epoch, score, time.monotonic() - start)
            result.epochs.append(stats)
            if on_epoch:
                on_epoch(stats)
            last_good = copy.deepcopy(student.state_dict())
            if config.max_time is not None and time.monotonic() - start >= config.max_time:
                result.stopped_by = "max_time"
                break
    except KeyboardInterrupt as exc:
        student.load_state_dict(last_good)
        raise Interrupted("interrupted during fine-tuning; nothing was written") from exc
    student.eval()
    return result
