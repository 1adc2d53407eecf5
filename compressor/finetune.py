"""Brief fine-tuning by distillation from the original model, and evaluation.

Loss per batch (Hinton et al. distillation; T the temperature)::

    L = T^2 * KL(softmax(teacher / T) || softmax(student / T))  [+ cross-entropy(student, y) if labels]

Optimiser: Adam, no weight decay (the thesis applies none to ACDC's A and D; the paper keeps
alpha out of it), cosine learning-rate decay over the budget. The parameters of the layers the
plan replaced train at ``lr``; the layers fixclf kept (convolutions, excluded Linears) are
already trained and move at ``lr * kept_lr_scale`` so that the large step the new layers need
does not undo them. Kept normalisation layers (BatchNorm and other running-statistics layers)
stay in eval mode, so their running statistics are never overwritten by the fine-tuning data;
``update_norm_stats=True`` lets them update as in ordinary training.

The run stops at ``epochs`` or after ``max_time`` seconds (checked after every step), whichever
comes first. The held-out score (accuracy with labels, else the negative distillation loss) is
reported per epoch but never used to pick a state: it is the figure the report quotes, so
selecting on it would overstate accuracy.

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
from .options import FinetuneOptions

__all__ = ["EpochStats", "FinetuneResult", "evaluate", "distill", "steps_per_epoch", "freeze_norm_statistics"]

NORM_WITH_STATISTICS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class EpochStats:
    epoch: int
    loss: float
    score: float  # held-out accuracy, or -distillation loss without labels
    seconds: float


@dataclass
class FinetuneResult:
    epochs: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    stopped_by: str = "epochs"


def steps_per_epoch(rows: int, options: FinetuneOptions) -> int:
    return math.ceil(rows / options.batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y)."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == y[start : start + batch_size]).sum())
    return correct / max(1, x.shape[0])


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1), log_target=True,
                    reduction="batchmean") * t * t


@torch.no_grad()
def _score(student: nn.Module, teacher: nn.Module, data: Dataset, options: FinetuneOptions) -> float:
    if data.has_labels:
        return evaluate(student, data.x_val, data.y_val, device=options.device)
    student.eval()
    x = data.x_val.to(options.device)
    return -float(_kd(student(x), teacher(x), options.temperature))


def _param_groups(student: nn.Module, new: list[nn.Parameter], options: FinetuneOptions) -> list[dict]:
    """The plan's new parameters train at ``lr``; every other parameter at ``lr * kept_lr_scale``."""
    new_ids = {id(p) for p in new}
    kept = [p for p in student.parameters() if id(p) not in new_ids]
    groups = [{"params": list(new), "lr": options.lr}]
    if kept:
        groups.append({"params": kept, "lr": options.lr * options.kept_lr_scale})
    return groups


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put the running-statistics normalisation layers (all kept: fixclf replaces only Linear layers)
    in eval mode, so their statistics stay as trained."""
    for module in model.modules():
        if isinstance(module, NORM_WITH_STATISTICS):
            module.eval()


def _diverged(epoch: int) -> TrainingError:
    return TrainingError(f"fine-tuning diverged (the loss became NaN or infinite) in epoch {epoch}; restored the state "
                         f"after epoch {epoch - 1} and wrote nothing; lower --lr")


def _train_epoch(student, teacher, data, options, optimiser, scheduler, order, epoch, on_step, deadline) -> tuple[float, int, bool]:
    """One pass over ``order``; returns (mean loss, steps run, deadline reached)."""
    total, steps = 0.0, 0
    for idx in order.split(options.batch_size):
        x = data.x_train[idx].to(options.device)
        with torch.no_grad():
            target = teacher(x)
        logits = student(x)
        loss = _kd(logits, target, options.temperature)
        if data.y_train is not None:
            loss = loss + F.cross_entropy(logits, data.y_train[idx].to(options.device))
        value = loss.detach().item()
        if not math.isfinite(value):
            raise _diverged(epoch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        total, steps = total + value, steps + 1
        if on_step:
            on_step(epoch, steps, value)
        if deadline is not None and time.monotonic() >= deadline:
            return total / steps, steps, True
    return total / max(1, steps), steps, False


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    options: FinetuneOptions,
    new_parameters: list[nn.Parameter],
    *,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` in place towards ``teacher`` on ``data.x_train``; returns the history.

    ``new_parameters``: the replaced layers' parameters (full ``lr``). ``on_step(epoch, step,
    loss)`` and ``on_epoch(stats)`` report progress (the CLI draws it).
    """
    student.to(options.device)
    teacher.to(options.device).eval()
    generator = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    optimiser = torch.optim.Adam(_param_groups(student, new_parameters, options), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, options.epochs * steps_per_epoch(n, options)))
    result = FinetuneResult()
    last_good = copy.deepcopy(student.state_dict())
    start = time.monotonic()
    deadline = start + options.max_time if options.max_time is not None else None
    try:
        for epoch in range(1, options.epochs + 1):
            student.train()
            if not options.update_norm_stats:
                freeze_norm_statistics(student)
            order = torch.randperm(n, generator=generator)
            loss, steps, timed_out = _train_epoch(student, teacher, data, options, optimiser, scheduler, order, epoch,
                                                  on_step, deadline)
            result.steps += steps
            stats = EpochStats(epoch, loss, _score(student, teacher, data, options), time.monotonic() - start)
            result.epochs.append(stats)
            if on_epoch:
                on_epoch(stats)
            last_good = copy.deepcopy(student.state_dict())
            if timed_out:
                result.stopped_by = "max_time"
                break
    except TrainingError:
        student.load_state_dict(last_good)
        raise
    except KeyboardInterrupt as exc:
        student.load_state_dict(last_good)
        raise Interrupted("interrupted during fine-tuning; nothing was written") from exc
    student.eval()
    return result
