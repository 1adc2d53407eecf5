"""Brief fine-tuning by distillation from the original model, and evaluation.

Loss per global batch B of rows (Hinton et al. distillation; T the temperature)::

    L = 1/|B| * sum_{i in B} [ T^2 * KL(softmax(teacher_i / T) || softmax(student_i / T))  (+ CE(student_i, y_i) with labels) ]

With ``mixup`` (the default wherever the data has random access) every training row r is replaced by w_r x_r + (1 - w_r) x_p(r) (a partner row of the
same global batch, w_r ~ U(0, 1): :class:`compressor.data.MixPartners`); the teacher labels the
mixed row and the cross-entropy becomes w_r CE(y_r) + (1 - w_r) CE(y_p(r)). The student then learns
the teacher's function between training rows rather than at them, which on noisy data is where
the teacher memorised the noise (docs/hard_samples.md: hard_cnn -2.5 pp without, +0.4 pp with).

A model whose outputs are probabilities (its forward ends in softmax: :func:`outputs_probabilities`)
is distilled on their logarithms, its logits up to a constant per row, which the loss ignores.

Budget: ``epochs``, by default the fewest epochs holding :data:`~compressor.options.BUDGET_STEPS`
optimiser steps (:func:`resolved_options`), so a brief fine-tune stays brief on large data and long
enough on small data.

Optimiser: Adam, no weight decay (the thesis applies none to ACDC's A and D; the paper keeps
alpha out of it), cosine learning-rate decay over the budget. The parameters of the layers the
plan replaced train at ``lr``; the layers fixclf kept (convolutions, excluded Linears) are
already trained and move at ``lr * kept_lr_scale`` so that the large step the new layers need
does not undo them. Kept normalisation layers (BatchNorm and other running-statistics layers)
stay in eval mode, so their running statistics are never overwritten by the fine-tuning data;
``update_norm_stats=True`` lets them update as in ordinary training.

Distributed (:mod:`compressor.distributed`): each process computes its chunk of the global batch
and its loss is scaled by ``world / |B|`` so that DDP's gradient average equals the gradient of L
above: N processes take the same steps as one process would (up to float summation order), except
that an epoch's last, partial batch that would give a process one row is left out.
After every step's forward pass the processes agree (one all-reduce) on the rows, the loss sum and
whether any failed, ran out of data or reached ``max_time``; only rank 0 evaluates.

Models with 2-D convolutions train in channels-last memory when they run in it
(:func:`channels_last`; the same function, faster kernels) and are put back in the default layout
afterwards.

On CUDA the forward passes run under autocast (bf16 where the GPU supports it, else fp16 with
gradient scaling) unless ``amp`` is off; parameters and optimiser state stay float32.

The run stops at ``epochs`` or after ``max_time`` seconds (checked after every step), whichever
comes first. The held-out score (accuracy with labels, else the negative distillation loss) is
reported per epoch but never used to pick a state: it is the figure the report quotes, so
selecting on it would overstate accuracy.

Resume (:class:`ResumeFile`): the student, optimiser, scheduler, gradient scaler, RNG state and
history are written atomically at the end of every epoch (and every ``save_every`` steps); a run
given the same file continues from there and ends in the same state as an uninterrupted run.

Guards: a non-finite loss stops the run, restores the last finite state (end of the last
complete epoch, or the initialisation) and raises :class:`TrainingError`; Ctrl-C does the same
and raises :class:`Interrupted`.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .pickles import CHECKPOINT_LIMITS, load_bounded
from .data import SPLIT_WORDS, DataSource, check_labels, training_batch_count
from .distributed import World
from .errors import DataError, FixclfError, Interrupted, OutputError, TrainingError, UsageError, exited_in_user_code
from .layers.base import ReplacesLinear
from .options import BUDGET_STEPS, FinetuneOptions
from .trace import training_logits

__all__ = ["EpochStats", "FinetuneResult", "ResumeFile", "saved_latency_verdict", "correct_rows", "evaluate", "distill",
           "steps_per_epoch", "resolved_options", "freeze_norm_statistics", "running_statistics", "channels_last"]

NORM_WITH_STATISTICS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
RUNNING_STATISTICS = ("running_", "moving_")
"""Name prefixes of the buffers in which other normalisation layers keep statistics they update in
training mode (timm's EvoNorm ``running_var``, ports of Keras' ``moving_mean``)."""
EVAL_BATCH = 512
RESUME_FORMAT = "fixclf.resume/1"


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
    samples_per_second: float = 0.0
    resumed_from: int | None = None  # the global step the run continued from
    auxiliary_outputs: int = 0  # outputs the training-mode forward returned besides the logits (left out of the loss)
    probabilities: bool = False  # the model's outputs are probabilities: the loss took their logarithms


@dataclass
class ResumeFile:
    """Where the fine-tune state is kept, and what must match to continue from it.

    ``fingerprint``: plain values describing the run (options, model, data); a state written by a
    run with another fingerprint is refused rather than silently mixed in."""

    path: Path
    fingerprint: dict
    save_every: int | None = None
    kept_for_latency: dict[str, str] | None = None
    """The layers ``--objective latency`` kept dense (name -> reason), as first decided: a resumed run
    reuses them (:func:`saved_latency_verdict`) rather than timing again, which near a tie may decide
    otherwise and train another plan."""


def saved_latency_verdict(path: Path) -> dict[str, str] | None:
    """The ``kept_for_latency`` of the resume state at ``path``; None when there is none to reuse (the
    state itself is checked when the fine-tune restores it)."""
    if not path.is_file():
        return None
    try:
        state = load_bounded(path, CHECKPOINT_LIMITS, UsageError, "", lambda exc: UsageError(str(exc)))
    except UsageError:
        return None
    verdict = state.get("kept_for_latency") if isinstance(state, dict) and state.get("format") == RESUME_FORMAT else None
    if isinstance(verdict, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in verdict.items()):
        return verdict
    return None


def steps_per_epoch(rows: int, options: FinetuneOptions, world: int = 1) -> int:
    """Optimiser steps in one epoch of ``rows`` training rows on ``world`` processes."""
    return training_batch_count(rows, options.batch_size, world)


def resolved_options(options: FinetuneOptions, data: DataSource) -> FinetuneOptions:
    """``options`` with the defaults that depend on the data made concrete: ``epochs`` None becomes the
    fewest epochs that hold at least :data:`BUDGET_STEPS` optimiser steps over ``data``'s training
    rows (a budget in steps, not epochs: the same brief fine-tune whether the data has 1,000 rows or
    100,000; only then are the rows counted), and ``mixup`` None becomes whether ``data`` can be mixed
    (random access and real-valued inputs: streams and token ids are not mixed)."""
    epochs = options.epochs
    if epochs is None:
        epochs = max(1, math.ceil(BUDGET_STEPS / steps_per_epoch(data.training_rows(), options)))
    mixup = options.mixup if options.mixup is not None else data.mixable
    return replace(options, epochs=epochs, mixup=mixup)


def _autocast(device: str, enabled: bool):
    if not (enabled and device.startswith("cuda")):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@torch.no_grad()
def correct_rows(model: nn.Module, data: DataSource | torch.Tensor, y: torch.Tensor | None = None, *,
                 device: str = "cpu", split: str = "val") -> torch.Tensor:
    """Whether ``model``'s top-1 class is the label, per row (bool, (rows,)), on the ``split`` rows
    (held-out by default) of a :class:`DataSource`, or on rows ``data`` with labels ``y``."""
    model.eval()
    if isinstance(data, DataSource):
        source, batches = data.source, data.batches(split, EVAL_BATCH)
    else:
        source, batches = "labels", zip(data.split(EVAL_BATCH), y.split(EVAL_BATCH))
    hits = []
    for x, labels, rows in _numbered(batches, split):
        logits, = _outputs([model], x.to(device), source, rows)
        check_labels(labels, logits.shape[-1], source)
        hits.append(logits.argmax(-1).cpu() == labels)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def _numbered(batches, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, str]]:
    """Each ``(x, labels)`` batch of the ``split`` rows with words that name its rows ("held-out rows 0-399")."""
    seen = 0
    for x, labels in batches:
        yield x, labels, f"{SPLIT_WORDS.get(split, split)} rows {seen:,}-{seen + x.shape[0] - 1:,}"
        seen += x.shape[0]


def _outputs(models: list[nn.Module], x: torch.Tensor, source: str, rows: str) -> list[torch.Tensor]:
    """Each model's output on rows ``x`` (named ``rows``). Integer rows that fail with an IndexError hold
    a token id beyond the vocabulary: the data's error; any other failure is raised as it is."""
    try:
        return [model(x) for model in models]
    except IndexError as exc:
        if x.is_floating_point():
            raise
        raise failed_in_model(source, exc, x, rows) from exc


def evaluate(model: nn.Module, data: DataSource | torch.Tensor, y: torch.Tensor | None = None, *,
             device: str = "cpu", split: str = "val") -> float:
    """Top-1 accuracy: the mean of :func:`correct_rows` (0 on no rows)."""
    hits = correct_rows(model, data, y, device=device, split=split)
    return float(hits.double().mean()) if hits.numel() else 0.0


def _shape_of(value) -> str:
    """A model output in a few words: a tensor's shape, else its type."""
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


PROBABILITY_SUM_TOLERANCE = 1e-3
"""How far from 1 the sum of a row of float32 probabilities may be (softmax sums are within ~1e-6); a
reduced-precision output may be off by two of its rounding steps (its eps: each value rounds within
half a step of itself, and all sum to 1)."""


@torch.no_grad()
def outputs_probabilities(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` (a forward ending in softmax; as the caller set its mode) returns probabilities
    on rows ``x`` (at least one): every output non-negative and each row (over the classes, the last
    axis) summing to 1."""
    out = model(x)
    tolerance = max(PROBABILITY_SUM_TOLERANCE, 2 * torch.finfo(out.dtype).eps) if out.is_floating_point() else 0.0
    out = out.float()
    return bool(out.numel() > 0 and out.shape[-1] > 1 and (out >= 0).all()
                and ((out.sum(-1) - 1).abs() <= tolerance).all())


def _as_logits(output: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """What the loss treats as logits: the output itself, or for probabilities their logarithm (the
    logits up to a constant per row, which every softmax in the loss ignores; zeros are clamped to the
    smallest float so that their logarithm stays finite)."""
    return torch.log(output.float().clamp_min(torch.finfo(torch.float32).tiny)) if probabilities else output


def _kd_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) summed over rows (and over token positions, as batchmean does)."""
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    log_target=True, reduction="sum") * t * t


@torch.no_grad()
def _score(student: nn.Module, teacher: nn.Module, data: DataSource, options: FinetuneOptions, device: str,
           probabilities: bool) -> float:
    if data.has_labels:
        return evaluate(student, data, device=device)
    student.eval()
    total = rows = 0.0
    for x, _, named in _numbered(data.batches("val", EVAL_BATCH), "val"):
        x = x.to(device)
        logits, target = (_as_logits(out, probabilities) for out in _outputs([student, teacher], x, data.source, named))
        total, rows = total + float(_kd_sum(logits, target, options.temperature)), rows + x.shape[0]
    return -total / max(1, rows)


def _param_groups(student: nn.Module, new: list[nn.Parameter], options: FinetuneOptions) -> list[dict]:
    """The plan's new parameters train at ``lr``; every other parameter at ``lr * kept_lr_scale``."""
    new_ids = {id(p) for p in new}
    kept = [p for p in student.parameters() if id(p) not in new_ids]
    groups = [{"params": list(new), "lr": options.lr}]
    if kept:
        groups.append({"params": kept, "lr": options.lr * options.kept_lr_scale})
    return groups


def running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The statistics ``module`` itself keeps outside PyTorch's norm classes: its floating-point buffers,
    and parameters that take no gradient, named ``running_*`` / ``moving_*`` (timm's EvoNorm, Keras ports)."""
    held = [*module.named_buffers(recurse=False),
            *((name, p) for name, p in module.named_parameters(recurse=False) if not p.requires_grad)]
    return [tensor for name, tensor in held if name.startswith(RUNNING_STATISTICS) and tensor.is_floating_point()]


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put the layers that keep running statistics (all kept: fixclf replaces only Linear layers) in
    eval mode, so their statistics stay as trained: PyTorch's batch and instance norms, and any
    submodule with :func:`running_statistics` (its own submodules keep their mode: dropout inside such
    a module still trains). ``model`` itself keeps its mode, as its forward is the whole model's: the
    fine-tune puts its own statistics back after every step instead (:class:`_Run`)."""
    for module in model.modules():
        if module is not model and (isinstance(module, NORM_WITH_STATISTICS) or running_statistics(module)):
            module.training = False


def _training_mode(model: nn.Module, options: FinetuneOptions) -> None:
    """``model`` as fine-tuning runs it: training mode, normalisation statistics frozen unless
    ``--update-norm-stats``."""
    model.train()
    if not options.update_norm_stats:
        freeze_norm_statistics(model)


def _diverged(epoch: int) -> FixclfError:
    return TrainingError(f"fine-tuning diverged (the loss became NaN or infinite) in epoch {epoch}; restored the state "
                         f"after epoch {epoch - 1} and wrote nothing; lower --lr")


class _TrainingLogits(nn.Module):
    """The student's training-mode logits: its output, or the first element of the ``(logits, aux, ...)``
    that GoogLeNet and Inception return while training (``auxiliary``: how many others there were,
    left out of the loss). Under torchrun DDP wraps this module, so its search for parameters without
    gradients starts from what the loss uses (an auxiliary head is then found unused, as it is)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student, self.auxiliary, self.container = student, 0, ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.student(x)
        logits = training_logits(output)
        if logits is None:
            first = output[0] if isinstance(output, (tuple, list)) and len(output) else None
            raise TrainingError(f"in training mode the model returns {_shape_of(output)}"
                                + (f" whose first element is {_shape_of(first)}" if first is not None else "")
                                + ", not logits; make its training-mode forward return the logits, or (logits, "
                                "auxiliary outputs...)")
        if logits is not output:
            self.auxiliary, self.container = len(output) - 1, type(output).__name__
        return logits


def _loss_misses_parameters(student: nn.Module, example: torch.Tensor, options: FinetuneOptions, device: str) -> bool:
    """Whether a training-mode forward leaves a trainable parameter out of the logits' graph (a Linear
    never called, an auxiliary head): DDP must then look for such parameters every step, or it waits for
    their gradients and fails the next step. Found on ``example`` rows; the RNG and buffers are put back
    (attributes a forward sets on the model itself are not)."""
    wanted = [p for p in student.parameters() if p.requires_grad]
    buffers = [b.clone() for b in student.buffers()]
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    try:
        with torch.random.fork_rng(devices=devices):
            return _misses(student, example, wanted, options)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(student.buffers(), buffers):
                buffer.copy_(saved)


def _misses(student: nn.Module, example: torch.Tensor, wanted: list[nn.Parameter], options: FinetuneOptions) -> bool:
    """One training-mode forward of ``example``: does some parameter of ``wanted`` get no gradient from the logits?
    (True when that cannot be told: the first step then says what is wrong.)"""
    _training_mode(student, options)
    try:
        logits = _TrainingLogits(student)(example)
    except Exception:  # the first step fails the same way, and says so
        return True
    if not logits.requires_grad or not wanted:
        return True
    return any(g is None for g in torch.autograd.grad(logits.float().sum(), wanted, allow_unused=True))


class _Run:
    """The state of one fine-tune: model, optimiser, schedule, position, history."""

    def __init__(self, student, teacher, data, options, new_parameters, seed, world, resume, on_step, on_epoch):
        self.student, self.teacher, self.data, self.options = student, teacher, data, options
        self.seed, self.world, self.resume, self.on_step, self.on_epoch = seed, world, resume, on_step, on_epoch
        self.device = world.device(options.device)
        self.epoch_steps = steps_per_epoch(data.training_rows(), options, world.size)
        self.optimiser = torch.optim.Adam(_param_groups(student, new_parameters, options), weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimiser, max(1, options.epochs * self.epoch_steps))
        fp16 = self.device.startswith("cuda") and options.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.logits = self.trainer = _TrainingLogits(student)
        if world.distributed:
            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            # buffers are constants or frozen statistics: synced once here, never in a forward pass, so a
            # forward pass holds no collective (a failing batch cannot leave another process waiting in one)
            misses = _loss_misses_parameters(student, data.head("train", 2)[0].to(self.device), options, self.device)
            self.trainer = nn.parallel.DistributedDataParallel(self.logits, device_ids=ids, forward_sync_buffers=False,
                                                               find_unused_parameters=misses)
        self.result = FinetuneResult(probabilities=outputs_probabilities(teacher, data.head("train", 64)[0].to(self.device)))
        self.epoch, self.step_in_epoch, self.samples, self.seconds = 1, 0, 0, 0.0
        self.started: float | None = None  # time.monotonic() when the fine-tune began, earlier invocations included
        self.root_statistics = ([] if options.update_norm_stats else
                                [(kept, kept.detach().clone()) for kept in running_statistics(student)])

    # --- resume ---------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"format": RESUME_FORMAT, "fingerprint": self.resume.fingerprint,
                "kept_for_latency": self.resume.kept_for_latency, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "steps": self.result.steps, "samples": self.samples,
                "seconds": self.elapsed(), "student": self.student.state_dict(), "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(), "history": [asdict(e) for e in self.result.epochs]}

    def elapsed(self) -> float:
        """Seconds of fine-tuning so far, earlier invocations of a resumed run included (mid-epoch too)."""
        return self.seconds if self.started is None else time.monotonic() - self.started

    def save(self) -> None:
        if self.resume is None or not self.world.is_main:
            return
        from .outputs import atomic_file

        state = self.state()
        with atomic_file(self.resume.path) as tmp:
            torch.save(state, tmp)

    def restore(self) -> None:
        if self.resume is None or not self.resume.path.is_file():
            return
        path = self.resume.path
        state = load_bounded(path, CHECKPOINT_LIMITS, UsageError, "it is not a fixclf resume state: delete it to start over",
                             lambda exc: UsageError(f"{path}: the resume state cannot be read ({type(exc).__name__}); "
                                                    "delete it to start over"))
        if (not isinstance(state, dict) or state.get("format") != RESUME_FORMAT or not isinstance(state.get("fingerprint"), dict)
                or not all(isinstance(key, str) for key in state["fingerprint"])):
            raise OutputError(f"{path} is not a fixclf resume state, so --resume does not replace it; delete it or "
                              "choose another --output")
        if state.get("fingerprint") != self.resume.fingerprint:
            differs = _what_differs(state["fingerprint"], self.resume.fingerprint)
            raise UsageError(f"{path} was written by another run: {differs}; run with the same checkpoint, data and "
                             "settings, or delete it to start over")
        fixed = self._fixed_buffers()
        try:
            self._check_position(state, path)
            self.student.load_state_dict(state["student"])
            _check_optimiser_state(state["optimiser"], self.optimiser)
            _check_schedule_state(state["scheduler"], self.scheduler)
            self.optimiser.load_state_dict(state["optimiser"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
            self.result.steps, self.samples = int(state["steps"]), int(state["samples"])
            self.seconds = float(state["seconds"])
            self.result.epochs = [EpochStats(**e) for e in state["history"]]
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise UsageError(f"{path}: the resume state does not fit this run ({type(exc).__name__}); delete it to "
                             "start over") from exc
        changed = [name for name, value in self._fixed_buffers().items() if not torch.equal(value, fixed[name])]
        if changed:
            raise UsageError(f"{path}: the resume state changes {changed[0]}, which never trains (its layer's fixed "
                             "permutation); the file is damaged: delete it to start over")
        self.result.resumed_from = self.result.steps

    def _fixed_buffers(self) -> dict[str, torch.Tensor]:
        """The structured layers' integer buffers (fixed permutations: set by the plan, never trained)."""
        return {f"{owner}.{name}": buffer.clone() for owner, module in self.student.named_modules()
                if isinstance(module, ReplacesLinear)
                for name, buffer in module.named_buffers() if not buffer.is_floating_point()}

    def _check_position(self, state: dict, path: Path) -> None:
        """Where the saved run stood must be a place this run can be: counts within the budget, time finite."""
        limits = {"epoch": self.options.epochs + 1, "step_in_epoch": self.epoch_steps,  # epochs + 1: all done
                  "steps": self.options.epochs * self.epoch_steps, "samples": 2**53}
        for key, limit in limits.items():
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise UsageError(f"{path}: the resume state's {key} ({value!r:.40}) is not a count between 0 and {limit}; "
                                 "the file is damaged: delete it to start over")
        if not isinstance(state["seconds"], (int, float)) or not 0 <= state["seconds"] < math.inf:
            raise UsageError(f"{path}: the resume state's seconds are not a finite time; the file is damaged: delete it "
                             "to start over")

    # --- one step -------------------------------------------------------------------------------------------

    def _forward(self, batch) -> tuple[torch.Tensor, float]:
        """This process's loss sum (not yet scaled) and its row count."""
        x, y, *mixing = batch
        partners = mixing[0] if mixing else None
        x = x.to(self.device)
        if partners is not None:  # w x + (1 - w) x', one weight per row
            weight = partners.weight.to(self.device, x.dtype).reshape(-1, *[1] * (x.dim() - 1))
            x = torch.lerp(partners.x.to(self.device, x.dtype), x, weight)
        with _autocast(self.device, self.options.amp):
            with torch.no_grad():
                target = self.teacher(x)
            logits = self._checked(self.trainer(x), target)
        probabilities = self.result.probabilities
        logits, target = _as_logits(logits, probabilities), _as_logits(target, probabilities)
        loss = _kd_sum(logits, target, self.options.temperature)
        if y is not None:
            loss = loss + self._label_loss(logits, y, partners)
        return loss, x.shape[0]

    def _checked(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training-mode logits, which must be shaped like the evaluation-mode ones (``target``)."""
        if logits.shape != target.shape:
            container = f"a {self.logits.container} whose first element is " if self.logits.container else ""
            raise TrainingError(f"in training mode the model returns {container}{_shape_of(logits)}, not logits shaped "
                                f"like its evaluation-mode output {tuple(target.shape)}; make its training-mode forward "
                                "return the logits, or (logits, auxiliary outputs...)")
        self.result.auxiliary_outputs = self.logits.auxiliary
        return logits

    def _label_loss(self, logits: torch.Tensor, y: torch.Tensor, partners) -> torch.Tensor:
        """Cross-entropy summed over rows; a mixed row's is w CE(y) + (1 - w) CE(y')."""
        check_labels(y, logits.shape[-1], self.data.source)
        ce = F.cross_entropy(logits.float(), y.to(self.device), reduction="none")
        if partners is None or partners.y is None:
            return ce.sum()
        check_labels(partners.y, logits.shape[-1], self.data.source)
        weight = partners.weight.to(self.device, ce.dtype)
        return (weight * ce + (1 - weight) * F.cross_entropy(logits.float(), partners.y.to(self.device), reduction="none")).sum()

    def step(self, batches: Iterator, deadline: float | None) -> tuple[bool, bool]:
        """One step on the next of ``batches`` (None: this process has run out); returns (epoch over, time up).

        Reading the batch and the forward pass may fail on one process only: the sync that follows
        them (before any gradient all-reduce) tells every process."""
        loss, rows, failure, batch = None, 0, None, None
        try:
            batch = next(batches)
            if batch is not None:
                loss, rows = self._forward(batch)
        except DataError as exc:
            failure = exc
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            failure = _batch_failure(self.data.source, exc, batch[0] if batch is not None else None,
                                     self.options.batch_size // self.world.size >= 2)
        except SystemExit as exc:  # the model's forward, maybe on this process only
            failure = exited_in_user_code(exc)
        with torch.no_grad():  # the model's own statistics, kept as trained (freeze_norm_statistics)
            for kept, saved in self.root_statistics:
                kept.copy_(saved)
        timed_out = deadline is not None and time.monotonic() >= deadline
        mine = [float(rows), float(loss.detach()) if loss is not None else 0.0, float(batch is None), float(timed_out)]
        total_rows, loss_sum, exhausted, time_up = [sum(c) for c in zip(*self.world.sync(mine, failure))]
        if exhausted:
            return True, bool(time_up)
        if not math.isfinite(loss_sum):
            raise _diverged(self.epoch)
        self.optimiser.zero_grad()
        self.scaler.scale(loss * (self.world.size / total_rows)).backward()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        self.scheduler.step()
        self.result.steps += 1
        self.step_in_epoch += 1
        self.samples += int(total_rows)
        if self.on_step and self.world.is_main:
            self.on_step(self.epoch, self.step_in_epoch, loss_sum / total_rows)
        self.epoch_loss += loss_sum
        self.epoch_rows += total_rows
        return False, bool(time_up)

    def _batches(self) -> Iterator:
        yield from self.data.batches("train", self.options.batch_size, epoch=self.epoch, seed=self.seed,
                                     rank=self.world.rank, world=self.world.size, skip=self.step_in_epoch,
                                     mix=self.options.mixup)
        while True:
            yield None

    def run_epoch(self, deadline: float | None) -> bool:
        """Train until the epoch's data ends; returns True when the time budget ran out."""
        _training_mode(self.student, self.options)
        self.epoch_loss = self.epoch_rows = 0.0
        since_save = 0
        batches = self._batches()
        while True:
            over, time_up = self.step(batches, deadline)
            if over or time_up:
                return time_up
            since_save += 1
            if self.resume is not None and self.resume.save_every and since_save >= self.resume.save_every:
                self.save()
                since_save = 0
        return False


def failed_in_model(source: str, exc: BaseException, x: torch.Tensor | None, what: str) -> DataError:
    """``what`` (rows ``x`` of the data, e.g. "held-out rows 0-255") failed in the model, in one line. Integer
    rows (token ids: the model indexes an embedding with them) that fail with an IndexError hold an id
    beyond the vocabulary; rows not held in memory (a Dataset, shards, a stream) are first run here."""
    said = (str(exc).splitlines() or [""])[0]
    ids = x is not None and not x.is_floating_point() and isinstance(exc, IndexError)
    fix = ("; token ids must be within the model's vocabulary (its nn.Embedding's num_embeddings); check --data" if ids
           else "")
    return DataError(f"{source}: {what} failed in the model ({type(exc).__name__}: {said[:150]}){fix}")


def _batch_failure(source: str, exc: BaseException, x: torch.Tensor | None, batches_hold_rows: bool) -> DataError:
    """A training batch (rows ``x``, None where reading it failed) that failed in the model, in one line.
    BatchNorm's refusal of a one-row batch names its cause: a ``--batch-size`` that gives each process
    one row, or (``batches_hold_rows``: the batch size gives each process two or more) data with too
    few training rows to fill one."""
    said = (str(exc).splitlines() or [""])[0]
    if "more than 1 value per channel" in said:
        cause = ("the data has too few training rows to give each process two; give it more rows" if batches_hold_rows
                 else "raise --batch-size")
        return DataError(f"{source}: a training batch gave a process one row, on which BatchNorm cannot update its "
                         f"statistics; {cause} (or drop --update-norm-stats)")
    return failed_in_model(source, exc, x, "a training batch")


def _epochs(run: _Run, options: FinetuneOptions, device: str) -> None:
    """Train ``run`` epoch by epoch to the budget; a diverged or interrupted run restores the state
    after the last complete epoch (or the initialisation) and raises."""
    student, resume = run.student, run.resume
    last_good = copy.deepcopy(student.state_dict())
    start = run.started = time.monotonic() - run.seconds  # a resumed run's earlier invocations count too
    deadline = start + options.max_time if options.max_time is not None else None
    try:
        while run.epoch <= options.epochs:
            time_up = run.run_epoch(deadline)
            run.seconds = time.monotonic() - start
            score = (_score(student, run.teacher, run.data, options, device, run.result.probabilities) if run.world.is_main
                     else float("nan"))
            stats = EpochStats(run.epoch, run.epoch_loss / max(1.0, run.epoch_rows), score, run.seconds)
            run.result.epochs.append(stats)
            if run.on_epoch and run.world.is_main:
                run.on_epoch(stats)
            last_good = copy.deepcopy(student.state_dict())
            run.epoch, run.step_in_epoch = run.epoch + 1, 0
            run.save()
            if time_up:
                run.result.stopped_by = "max_time"
                break
    except TrainingError:
        student.load_state_dict(last_good)
        raise
    except KeyboardInterrupt as exc:
        student.load_state_dict(last_good)
        raise interrupted("during fine-tuning", resume.path if resume is not None else None) from exc


def _check_optimiser_state(saved, optimiser: torch.optim.Optimizer) -> None:
    """ValueError unless ``saved`` is this optimiser's state after some steps: its groups hold the same
    settings (the run's, which the fingerprint fixed; the schedule moves only ``lr``) and each
    parameter's moments its shape."""
    def settings(group) -> dict:
        return {k: v for k, v in group.items() if k != "lr"} if isinstance(group, dict) else {}

    fresh = optimiser.state_dict()["param_groups"]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if (not isinstance(groups, list) or [settings(g) for g in groups] != [settings(g) for g in fresh]
            or not all(isinstance(g["lr"], float) and math.isfinite(g["lr"]) for g in groups)):
        raise ValueError("optimiser settings")
    parameters = [p for group in optimiser.param_groups for p in group["params"]]
    for index, moments in (saved.get("state") or {}).items():
        if not (isinstance(index, int) and 0 <= index < len(parameters) and isinstance(moments, dict)):
            raise ValueError("optimiser state")
        for name, value in moments.items():
            shape = () if name == "step" else parameters[index].shape
            if not isinstance(value, torch.Tensor) or value.shape != shape or not value.is_floating_point():
                raise ValueError(f"optimiser state {name}")


def _check_schedule_state(saved, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """ValueError unless ``saved`` is this schedule's state: the same settings, only its position and
    last rates moved (whole numbers and finite rates)."""
    fresh = scheduler.state_dict()
    moving = {"last_epoch", "_step_count", "_last_lr"}
    if not isinstance(saved, dict) or set(saved) != set(fresh) or any(saved[k] != fresh[k] for k in set(fresh) - moving):
        raise ValueError("schedule settings")
    rates = saved["_last_lr"]
    if (not all(isinstance(saved[k], int) and not isinstance(saved[k], bool) and saved[k] >= 0 for k in ("last_epoch", "_step_count"))
            or not isinstance(rates, list) or not all(isinstance(r, float) and math.isfinite(r) for r in rates)):
        raise ValueError("schedule position")


def _what_differs(saved: dict, now: dict) -> str:
    """How the run that wrote a resume state differs from this one, by its fingerprints' keys."""
    changed = sorted(k for k in {**saved, **now} if saved.get(k) != now.get(k))
    said = {"model_sha256": "the checkpoint's bytes changed since", "data_files": "the data files changed since "
            "(size or modification time)", "data": "it read other data", "world_size": "it ran as another number of processes"}
    settings = [k for k in changed if k not in said]
    return "; ".join([said[k] for k in changed if k in said] + ([f"other settings ({', '.join(settings)})"] if settings else []))


def interrupted(when: str, state: Path | None) -> Interrupted:
    """The error of a Ctrl-C (or SIGTERM) ``when`` it came: nothing was written, and the resume ``state``,
    if the fine-tune kept one there, continues the run."""
    kept = f"; the fine-tune state is kept in {state}: rerun with --resume to continue" if (
        state is not None and state.is_file()) else ""
    return Interrupted(f"interrupted {when}; nothing was written{kept}")


@torch.no_grad()
def channels_last(models: list[nn.Module], example: torch.Tensor) -> list[nn.Module]:
    """Put the models that have 2-D convolutions into channels-last memory for the fine-tune, when they
    run in it; returns those converted (put them back with ``.to(memory_format=torch.contiguous_format)``:
    the values never change, only their layout).

    PyTorch's CPU kernels run small-image pooling far faster in that layout (the digits CNN's 2x2
    max-pool of 64 x 64 x 8 x 8: 0.04 against 0.79 ms) and convolutions (oneDNN) a little faster: the
    convolutional samples' fine-tune steps 1.1-1.2x (``benchmarks/bench_conv_layout.py``). A model
    that is already channels-last is left alone, and so is one whose forward fails in the new layout
    (a ``.view`` of an activation, say), which is put back at once.
    """
    converted = []
    for model in models:
        weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not weights or any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights):
            continue
        model.to(memory_format=torch.channels_last)
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()(example)  # eval: no running statistic moves, no dropout draws from the RNG
        except (RuntimeError, ValueError, TypeError, IndexError):
            model.to(memory_format=torch.contiguous_format)
            continue
        finally:
            for module, training in modes.items():
                module.training = training
        converted.append(model)
    return converted


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: DataSource,
    options: FinetuneOptions,
    new_parameters: list[nn.Parameter],
    *,
    seed: int = 0,
    world: World | None = None,
    resume: ResumeFile | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` in place towards ``teacher`` on ``data``'s training rows; returns the history.

    ``new_parameters``: the replaced layers' parameters (full ``lr``). ``world``: this process's
    place in a torchrun job (default: alone). ``resume``: keep and continue from a resume state.
    ``on_step(epoch, step, loss)`` and ``on_epoch(stats)`` report progress on rank 0 (the CLI draws it)."""
    world = world or World()
    device = world.device(options.device)
    student.to(device)
    teacher.to(device).eval()
    with world.stage():  # every process has counted its data before DDP's first collective
        data.training_rows()
        options = resolved_options(options, data)
    converted = channels_last([student, teacher], data.head("train", 2)[0].to(device))
    try:
        run = _Run(student, teacher, data, options, new_parameters, seed, world, resume, on_step, on_epoch)
        run.restore()
        _epochs(run, options, device)
    finally:
        for model in converted:
            model.to(memory_format=torch.contiguous_format)
    run.result.samples_per_second = run.samples / max(1e-9, run.seconds)
    student.eval()
    return run.result
