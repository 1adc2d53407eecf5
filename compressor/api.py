"""The public pipeline: one call per CLI command, each a short sequence of stages.

``compress``: validate options -> load (:mod:`checkpoint`) -> plan (:mod:`surgery`) -> data
(:mod:`data`) -> outputs checked (:mod:`outputs`) -> surgery and initialisation -> fine-tune
(:mod:`finetune`) -> export and validate (:mod:`export`, :mod:`runtime`) -> report
(:mod:`report`) -> every file committed together.

>>> from compressor import compress, CompressOptions, SourceOptions
>>> report = compress(CompressOptions(SourceOptions("sample_models/mlp.pt")))
>>> report.params.replaced.ratio, report.accuracy.after
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from . import runtime
from .checkpoint import Architecture, LoadedModel, compressed_payload, load_compressed, load_model, read_stored_report
from .cost import LayerCost, layer_shapes, measure
from .data import DataSource, check_against_model, dtype_name, load_data
from .distributed import World, world_from_environment
from .errors import DataError, ExportError, Interrupted, PlanError, UsageError
from .export import ExportResult, ExportSpec, choose_formats, main_format, to_onnx, validate_lengths, write_exports
from .finetune import (EpochStats, FinetuneResult, ResumeFile, correct_rows, distill, evaluate, interrupted,
                       resolved_options, saved_latency_verdict, steps_per_epoch)
from .layers import count_stored
from .modelcopy import copy_model
from .options import (KEEP, CompressOptions, ExportCommand, ExportOptions, PlanOptions, SourceOptions, check_file_name,
                      check_instance)
from .outputs import Artifacts, check_resume_path, compress_outputs, export_outputs, latest_compressed, resume_path
from .report import (Accuracy, Counts, DataSummary, FinetuneSummary, LatencyPair, LayerRow, OnnxFigures,
                     ParamSummary, PlanReport, ReducedFigures, Report, ratio)
from .surgery import (LayerPlan, apply_plan, initialise_from_dense, make_plan, replaced_numbers,
                      replaced_parameters, with_dense_layer)

__all__ = ["Events", "ExportCommand", "compress", "plan_checkpoint", "export_checkpoint", "load_report",
           "load_compressed_model"]

CALIBRATION_ROWS = 1024
VALIDATION_ROWS = 256
MOBILE_RUNS = 200  # batch-1 runs are short: more of them for a stable median
DROP_WARNING = 0.01  # a held-out accuracy drop larger than this (1 pp) is a warning in the report
FEW_HELD_OUT = 100  # held-out rows under which the accuracy figures are too coarse to read a drop from (1 pp a row)
NOT_RECOVERED_MARGIN = 0.005  # accuracy this far below the original, and no better than at initialisation
BUDGET_MARGIN_SE = 1.645
"""``--max-drop`` accepts a plan when its loss on the rows set aside plus this many standard errors
is within the budget: a one-sided 95% bound. One standard error (84%) was too little: on hard_mlp
the full plan's 0.05 ± 0.38 pp passed on the 2,000 rows set aside and lost 0.70 pp on the held-out
rows (docs/benchmarks.md)."""


class Events:
    """Progress hooks; the CLI overrides them to draw rich progress. All are no-ops here."""

    def stage(self, text: str) -> None: ...

    def finetune_start(self, epochs: int, steps_per_epoch: int, rows: int) -> None: ...

    def step(self, epoch: int, step: int, loss: float) -> None: ...

    def epoch(self, stats: EpochStats) -> None: ...


def _load(source: SourceOptions) -> LoadedModel:
    return load_model(source.checkpoint, arch=source.arch, arch_kwargs=source.arch_kwargs,
                      trust_pickle=bool(source.trust_pickle))  # validated: a bool (or numpy bool)


def _load_uncompressed(source: SourceOptions) -> LoadedModel:
    """The model to compress (or plan): a checkpoint fixclf already compressed is refused by name."""
    loaded = _load(source)
    if loaded.compressed:
        raise PlanError(f"{loaded.path} is already compressed by fixclf; compress the original checkpoint (fixclf report "
                        "shows its report, fixclf export writes its ONNX file again)")
    return loaded


def _data_for(loaded: LoadedModel, spec: str | Path | None, seed: int, held: dict[str, int], selection: bool = False,
              needed_for: str = "to fine-tune the new layers by distillation and to validate the ONNX export") -> DataSource:
    """The data, checked against the model, including the rows the command will hold (``held``: split ->
    rows of its head; :func:`compressor.data.check_against_model`)."""
    source = spec if spec is not None else loaded.data
    if source is None:
        raise DataError(f"{loaded.path} comes with no data: pass --data FILE.npz (x: input samples, y: labels, optional); "
                        f"fixclf needs real inputs {needed_for}")
    if spec is None and not Path(source).is_file():  # a checkpoint names a regular file only (a directory is shards)
        problem = "is not a regular file" if Path(source).exists() else "is not there"
        raise DataError(f"{loaded.path} names the data file {Path(source).name} beside it, which {problem}; pass "
                        "--data FILE.npz")
    data = load_data(source, seed=seed, selection=selection)
    check_against_model(data, loaded.model, held)
    return data


def _inputs(loaded: LoadedModel, data: DataSource | None) -> list[Path]:
    """Every file a command read: never to be overwritten by its outputs."""
    files = [loaded.path, loaded.data, loaded.factory_file, *(data.files if data else ())]
    return [Path(f) for f in files if f is not None]


def _rows(plan: list[LayerPlan], costs: dict[str, LayerCost] | None = None) -> list[LayerRow]:
    return [LayerRow(**asdict(entry), cost=(costs or {}).get(entry.name)) for entry in plan]


def _plan(loaded: LoadedModel, example: torch.Tensor | None, options: CompressOptions, measure_cost: bool,
          world: World | None = None, verdict: dict[str, str] | None = None
          ) -> tuple[list[LayerPlan], dict[str, LayerCost], dict[str, str]]:
    """The plan, with each replaced layer timed alone at the model's real shapes when there is data to
    find them (always for ``--objective latency``, where slower replacements are then kept dense: the
    third value, name -> reason, unless ``verdict`` gives it already, as a resumed run's state does).
    Under torchrun only rank 0 times the layers and every process takes its verdict: timings taken by
    several processes at once differ, and every process must train the same plan. ``example``: two
    rows of the data (:func:`_example`), None without data."""
    world = world or World()
    plan = _replan(loaded, example, options, {})
    latency = options.plan.objective == "latency"
    if example is None or not (measure_cost or latency):
        return plan, {}, {}
    costs = {}
    if world.is_main:
        tokens = layer_shapes(loaded.model, [p.name for p in plan if p.replaced], example)
        costs = measure(loaded.model, plan, tokens, options.export.latency_batch)
    if not latency:
        return plan, costs, {}
    if verdict is None:
        verdict = {name: f"slower than dense at batch 1 ({c.structured_batch1_ms:.3f} vs {c.dense_batch1_ms:.3f} ms)"
                   for name, c in costs.items() if c.slower_at_batch1}
    verdict = world.sync(verdict)[0]  # rank 0's
    kept = _replan(loaded, example, options, verdict)
    changed = [entry for entry, was in zip(kept, plan) if entry.replaced and entry != was]  # a feeder back at its depth
    if world.is_main and changed:
        costs |= measure(loaded.model, changed, tokens, options.export.latency_batch)
    return kept, costs, verdict


def _example(data: DataSource | None) -> torch.Tensor | None:
    """Two rows of the data's held-out split, with which plans find heads and feeders; None without data."""
    return data.head("val", 2)[0] if data is not None else None


def _replan(loaded: LoadedModel, example: torch.Tensor | None, options: CompressOptions, keep: dict[str, str]
            ) -> list[LayerPlan]:
    """The plan with the layers in ``keep`` (name -> reason) kept dense (:func:`make_plan`; ``example``:
    two rows of the data, or None without data)."""
    return make_plan(loaded.model, options.plan, seed=options.seed, example=example, keep=keep)


NOTHING_FASTER = ("no layer would be replaced: every replacement is slower than its dense layer at this model's "
                  "shapes; use --objective size to compress for size anyway")


def _cost_warnings(rows: list[LayerRow]) -> list[str]:
    if all(r.kind is None for r in rows):
        return [NOTHING_FASTER]
    timed = [r for r in rows if r.kind is not None and r.cost is not None]
    if not timed:
        return []
    dense = sum(r.cost.dense_batch1_ms for r in timed)
    structured = sum(r.cost.structured_batch1_ms for r in timed)
    if structured <= dense:
        return []
    return [f"the replaced layers will be slower at batch 1: {dense:.3f} ms dense, {structured:.3f} ms structured "
            f"(summed, each alone); --objective latency keeps the slower ones dense"]


def _growth_warnings(plan: list[LayerPlan]) -> list[str]:
    """Replacements that store at least as many numbers as their dense layer (hidden layers never are:
    they stay dense; a head's kind is the user's choice, and the orthogonal head stores its C x N code)."""
    return [f"layer {p.name or '(the model)'}: the {p.kind} head stores {p.params_after:,} numbers, the dense one "
            f"{p.params_before:,}; it fixes the classifier without compressing it" + (
                " (--head hadamard computes its code instead of storing it)" if p.kind != "hadamard" else "")
            for p in plan if p.replaced and p.params_after >= p.params_before]


def _headless_warnings(plan: list[LayerPlan], options: PlanOptions) -> list[str]:
    """``--head`` asked for a head, and the model has none (:mod:`compressor.trace`): it replaced nothing."""
    if options.head == KEEP or any(p.role == "head" for p in plan):
        return []
    return [f"no classification head was found: no Linear of the output's width makes the logits through sums, "
            f"scales, reshapes or softmax alone (the model applies something else after its last Linear: a "
            f"normalisation, a sigmoid, a Linear's weights used directly), so --head {options.head} replaced nothing "
            "and every Linear was planned as a hidden layer"]


def _params(original: nn.Module, plan: list[LayerPlan]) -> ParamSummary:
    before, freed = count_stored(original), replaced_numbers(original, plan)
    new = sum(p.params_after for p in plan if p.replaced)  # the replaced layers: only what replacing them frees counts
    return ParamSummary(Counts.of(before, before - freed + new), Counts.of(freed, new))


PLAN_WITHOUT_DATA = ("no data: pass --data to time each layer at the model's real shapes and to find the heads and the "
                     "layers feeding them from the forward pass, as compress does (a head of more classes than "
                     "features makes the stack feeding it deeper, or stays dense when no such stack feeds it)")


def plan_checkpoint(options: CompressOptions) -> PlanReport:
    """What ``compress`` would replace, by what, the stored numbers and, when there is data (``--data``
    or the checkpoint's bundled file), each layer's ORT latency alone, dense and structured. Writes nothing."""
    check_instance("plan_checkpoint(options)", options, CompressOptions)
    options.validate()
    loaded = _load_uncompressed(options.source)
    data = None
    if options.source.data is not None or loaded.data is not None:
        data = _data_for(loaded, options.source.data, options.seed, {"val": VALIDATION_ROWS})
    elif options.plan.objective == "latency":
        raise UsageError(f"--objective latency times each layer on real inputs, and {loaded.path} comes with no data: "
                         "pass --data FILE")
    if data is not None:  # what compress checks first: plan says so now rather than leave it to compress
        _original_onnx(loaded.model, data.head("val", VALIDATION_ROWS)[0], options, Events(),
                       consequence="compress would stop here, before any fine-tuning")
    plan, costs, _ = _plan(loaded, _example(data), options, measure_cost=True)
    rows = _rows(plan, costs)
    notes = [] if data is not None else [PLAN_WITHOUT_DATA]
    return PlanReport(str(loaded.path), rows, _params(loaded.model, plan), notes,
                      _headless_warnings(plan, options.plan) + _growth_warnings(plan) + _cost_warnings(rows))


def _check_device(device: str) -> None:
    if device != "cpu" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} is not available on this machine (no CUDA device); use --device cpu")


def _requested_formats(options: ExportOptions) -> dict[str, str]:
    return ({"onnx": "onnx"} | ({"onnx-int8": "int8"} if options.quantize else {})
            | ({"onnx-fp16": "fp16"} if options.precision == "fp16" else {}) | ({"ort": "ort"} if options.ort_format else {}))


def _data_reference(data: DataSource, output: Path) -> str | None:
    """The data file, relative to the output's directory when it lies below it (so report and export
    find it again); None otherwise (``fixclf export`` then needs ``--data``)."""
    if len(data.files) != 1 or not data.files[0].is_file() or data.files[0].suffix not in (".npz", ".pt"):
        return None
    relative = os.path.relpath(data.files[0].resolve(), output.resolve().parent)
    return None if relative.startswith("..") else Path(relative).as_posix()


def _finetune(original: nn.Module, compressed: nn.Module, plan: list[LayerPlan], data: DataSource,
              options: CompressOptions, events: Events, world: World,
              resume: ResumeFile | None) -> tuple[FinetuneResult, Accuracy | None]:
    events.stage("Initialising the structured layers from the dense ones")
    calibration = data.head("train", CALIBRATION_ROWS)[0]
    initialise_from_dense(original, compressed, plan, calibration, fit=options.finetune.init == "fit")
    world.check_identical(compressed.state_dict())
    before = after_init = None
    if data.has_labels and world.is_main:
        before, after_init = evaluate(original, data), evaluate(compressed, data)
    events.stage("Fine-tuning by distillation from the original"
                 + (f" ({world.size} processes)" if world.distributed else ""))
    rows = data.training_rows()
    events.finetune_start(options.finetune.epochs, steps_per_epoch(rows, options.finetune, world.size), rows)
    tuned = distill(compressed, original, data, options.finetune, replaced_parameters(compressed, plan),
                    seed=options.seed, world=world, resume=resume, on_step=events.step, on_epoch=events.epoch)
    compressed.cpu()
    original.cpu()
    if not data.has_labels or not world.is_main:
        return tuned, None
    return tuned, Accuracy(before, after_init, evaluate(compressed, data))


def _surgery_and_finetune(original: nn.Module, plan: list[LayerPlan], data: DataSource, options: CompressOptions,
                          events: Events, world: World, resume: ResumeFile | None):
    """The compressed model, the formats it can be written in (decided and said before the fine-tune),
    their notes, and the fine-tune's result and accuracy."""
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        compressed = apply_plan(copy_model(original), plan)
        formats, notes = choose_formats(compressed, _requested_formats(options.export))
        for note in notes:
            events.stage(f"note: {note}")
        return (compressed, formats, notes, *_finetune(original, compressed, plan, data, options, events, world, resume))


def paired_drop(reference: torch.Tensor, hits: torch.Tensor) -> tuple[float, float]:
    """Accuracy lost, in pp, from per-row correctness ``reference`` to ``hits`` on the same rows, and
    its standard error: d_i = reference_i - hits_i in {-1, 0, 1}, drop = mean(d), se = std(d) / sqrt(n)."""
    d = reference.double() - hits.double()
    se = float(d.std(unbiased=True)) / d.numel() ** 0.5 if d.numel() > 1 else 0.0
    return 100 * float(d.mean()), 100 * se


def _compress_within_budget(original: nn.Module, plan: list[LayerPlan], data: DataSource, options: CompressOptions,
                            events: Events, world: World, resume: ResumeFile | None,
                            replan: Callable[[dict[str, str]], list[LayerPlan]]):
    """The plan used, then surgery and fine-tune's results; with ``--max-drop``, again with the
    costliest replaced layer kept dense (measured by putting each one back alone) until the accuracy
    lost on the selection rows, set aside from training and distinct from the held-out rows, is
    within budget *with a margin of :data:`BUDGET_MARGIN_SE` standard errors* of that paired
    difference (:func:`paired_drop`): the run that passes first is the luckiest of several draws on
    the same rows, so its own estimate flatters it. When no plan passes with the margin, the plan
    with the most layers replaced whose estimate alone was within budget is returned, and its note
    says the rows set aside could not confirm it. Every process decides the same (same model, same
    rows). ``replan(keep)``: the plan with the layers in ``keep`` (name -> reason) kept dense too."""
    budget, kept, candidate = options.plan.max_drop, {}, None
    reference = correct_rows(original, data, split="select") if budget is not None else None
    while True:
        result = plan, *_surgery_and_finetune(original, plan, data, options, events, world, resume)
        if budget is None:
            return result
        compressed, notes = result[1], result[3]
        hits = correct_rows(compressed, data, split="select")
        lost, se = paired_drop(reference, hits)
        said = f"--max-drop {budget:g}: {lost:.2f} ± {se:.2f} pp lost on the rows set aside" + (
            f" after keeping {', '.join(name or 'the model' for name in kept)} dense" if kept else "")
        if lost + BUDGET_MARGIN_SE * se <= budget:
            notes.insert(0, said)
            return result
        if candidate is None and lost <= budget:
            candidate = result
            notes.insert(0, f"{said}: within the budget, but not with a margin of {BUDGET_MARGIN_SE:g} standard errors, "
                         "and no plan with more layers kept was; more rows set aside (x_select/y_select) would decide")
        replaced = [entry.name for entry in plan if entry.replaced]
        if len(replaced) == 1:
            if candidate is not None:
                return candidate
            raise PlanError(f"no plan stays within --max-drop {budget:g}: with only {replaced[0] or 'the model'} "
                            f"replaced, {lost:.2f} ± {se:.2f} pp are lost on the rows set aside; raise --max-drop or "
                            "fine-tune longer (--epochs)")
        costliest, regained = _costliest_layer(compressed, original, data, replaced, float(hits.double().mean()))
        events.stage(f"{said}; keeping {costliest or 'the model'} dense and fine-tuning again")
        kept[costliest] = _kept_for_budget(budget, regained)
        plan = replan(kept)


def _kept_for_budget(budget: float, regained: float) -> str:
    """Why ``--max-drop`` kept a layer dense, in the plan's table."""
    if regained > 0:
        return f"kept dense for --max-drop {budget:g} (putting it back regained {100 * regained:.2f} pp on the rows set aside)"
    if regained == 0:
        return (f"kept dense for --max-drop {budget:g}: putting back any one replaced layer's dense original changed "
                "nothing on the rows set aside, and this one is the first of them")
    return (f"kept dense for --max-drop {budget:g}: putting any replaced layer's dense original back into the fine-tuned "
            f"model lowered its accuracy on the rows set aside (its neighbours had adapted to the replacement), this one "
            f"the least ({100 * regained:.2f} pp)")


def _costliest_layer(compressed: nn.Module, original: nn.Module, data: DataSource, replaced: list[str],
                     score: float) -> tuple[str, float]:
    """The replaced layer whose dense original, put back alone, regains the most accuracy on the
    selection rows, and what it regains (a fraction)."""
    regained = {name: evaluate(with_dense_layer(compressed, original, name), data, split="select") - score
                for name in replaced}
    costliest = max(regained, key=regained.get)
    return costliest, regained[costliest]


def _probability_notes(tuned: FinetuneResult) -> list[str]:
    """Said when the model's outputs are probabilities, which fine-tuning handled by their logarithms."""
    return ["the model returns probabilities (its forward ends in softmax): fine-tuning distilled their logarithms, "
            "the logits up to a constant per row"] if tuned.probabilities else []


def _few_held_out(accuracy: Accuracy | None, rows: int | None) -> list[str]:
    """Accuracy figures from fewer than :data:`FEW_HELD_OUT` held-out rows, where one row moves them by 1 pp or more."""
    if accuracy is None or not rows or rows >= FEW_HELD_OUT:
        return []
    return [f"the held-out accuracy comes from {rows} row{'s' if rows > 1 else ''} (one row is {100 / rows:.3g} pp), too few "
            "to tell a drop from chance; give more rows, or an x_val / y_val split of a few hundred"]


def _slower_warnings(latency: LatencyPair | None, mobile: LatencyPair | None) -> list[str]:
    """The exported compressed model runs slower than the original in ONNX Runtime (by 1% or more; a
    factor under 1.1 with two decimals, so that it never reads "1.0x slower")."""
    def factor(pair: LatencyPair) -> str:
        slowdown = 1 / pair.speedup
        return f"{slowdown:.2f}" if slowdown < 1.1 else f"{slowdown:.1f}"

    slower = [f"{pair.after.batch} row{'s' if pair.after.batch > 1 else ''} on {pair.after.threads} thread"
              f"{'s' if pair.after.threads > 1 else ''}: {factor(pair)}x slower"
              for pair in (mobile, latency) if pair is not None and pair.speedup is not None and pair.speedup < 0.99]
    if not slower:
        return []
    return [f"the compressed model runs slower than the original in ONNX Runtime ({'; '.join(slower)}); it buys size, "
            "not speed: --objective latency keeps the layers whose replacement is slower dense (fixclf plan shows each)"]


def _warnings(accuracy: Accuracy | None, tuned: FinetuneResult, max_drop: float | None) -> list[str]:
    """What the user should know about the fine-tune's outcome: a held-out drop over 1 pp, or over
    ``--max-drop`` when one was given (the budget is judged on other rows, so the held-out figure can exceed it)."""
    found = []
    if tuned.auxiliary_outputs:
        found.append(f"in training mode the model also returns {tuned.auxiliary_outputs} auxiliary output(s) after its "
                     "logits (as GoogLeNet and Inception do); fine-tuning used the logits only, so auxiliary heads were "
                     "not trained")
    if accuracy is None:
        return found
    if accuracy.after <= accuracy.after_init and accuracy.after < accuracy.before - NOT_RECOVERED_MARGIN:
        found.append(f"fine-tuning has not recovered the model: held-out accuracy {accuracy.after:.2%} is no better than "
                     f"right after initialisation ({accuracy.after_init:.2%}; original {accuracy.before:.2%}) after "
                     f"{len(tuned.epochs)} epoch(s); fine-tune longer (--epochs, --max-time) or raise --lr")
    elif accuracy.after < accuracy.before - (DROP_WARNING if max_drop is None else max_drop / 100):
        budget = ("keep the most sensitive layers dense (--max-drop PP)" if max_drop is None else
                  f"lower --max-drop below {max_drop:g} (it is judged on rows set aside, which put the drop within it)")
        found.append(f"held-out accuracy dropped {100 * (accuracy.before - accuracy.after):.2f} pp ({accuracy.before:.2%} -> "
                     f"{accuracy.after:.2%}) after {len(tuned.epochs)} epoch(s); fine-tune longer (--epochs, --max-time), "
                     f"{budget} or replace fewer (--exclude)")
    return found


def _original_onnx(original: nn.Module, samples: torch.Tensor, options: CompressOptions, events: Events, *,
                   consequence: str = "nothing was fine-tuned") -> bytes:
    """The original model as validated ONNX bytes (in memory, for size and latency), made before any
    fine-tuning so that a model ONNX cannot express fails before the work, not after it.
    ``samples``: the validation rows (VALIDATION_ROWS of the held-out split), shared with :func:`_export`;
    ``consequence``: what the refusal says of the work."""
    events.stage("Exporting the original model to ONNX (in memory, for size and latency)")
    with torch.no_grad():
        finite = bool(torch.isfinite(original.eval()(samples)).all())
    if not finite:
        raise DataError(f"the original model's outputs on the held-out rows are not finite (NaN or infinity), so nothing "
                        f"can be compared with them: the rows are outside the range the model works in (largest |x| "
                        f"{float(samples.abs().max()):.3g}); scale the data as the model was trained on it")
    try:
        spec = ExportSpec(dynamic_tokens=options.export.dynamic_tokens)
        original_bytes = to_onnx(original, samples, spec).proto.SerializeToString()
        validate_lengths(original_bytes, original, samples, tolerance=options.export.tolerance, spec=spec)
    except ExportError as exc:
        looks_up = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in original.modules())
        hint = ("" if not looks_up or samples.is_floating_point() or samples.dtype == torch.int64 else
                f" (x is {dtype_name(samples.dtype)}: the exporter lowers some index operations, "
                "e.g. nn.EmbeddingBag's, for int64 only; store the ids as int64)")
        raise ExportError(f"the original model cannot be exported to ONNX as asked, so fixclf cannot measure or "
                          f"deliver it; {consequence}: {exc}{hint}") from exc
    return original_bytes


def _export(original: nn.Module, original_bytes: bytes, compressed: nn.Module, samples: torch.Tensor, data: DataSource,
            options: CompressOptions, artifacts: Artifacts, formats: dict[str, str], events: Events
            ) -> tuple[ExportResult, OnnxFigures, LatencyPair, LatencyPair, dict[str, ReducedFigures]]:
    timing = data.head("val", options.export.latency_batch)[0]
    events.stage("Exporting the compressed model to ONNX and validating it in ONNX Runtime")
    result = write_exports(compressed, samples, artifacts, formats, tolerance=options.export.tolerance,
                           spec=ExportSpec(dynamic_tokens=options.export.dynamic_tokens))
    main = result.files["onnx"]
    onnx = OnnxFigures(main.path, len(original_bytes), main.bytes, ratio(len(original_bytes), main.bytes),
                       result.stored_parameter_bytes, result.constant_bytes, main.max_abs_diff, main.max_rel_diff,
                       options.export.tolerance, [f.path for name, f in result.files.items() if name != "onnx"],
                       result.mobile_notes, result.files["ort"].bytes if "ort" in result.files else None)
    events.stage("Measuring ONNX Runtime latency (before and after in alternating rounds, thread spinning off)")
    pair = (original_bytes, artifacts.written("onnx"))
    before, after = runtime.paired_latency(pair, timing)
    mobile = runtime.paired_latency(pair, timing[:1], threads=1, runs=MOBILE_RUNS)
    reduced = {}
    for name, role in (("onnx-int8", "int8"), ("onnx-fp16", "fp16")):
        if name in result.files:
            q, q_file = result.files[name], artifacts.written(role)
            reduced[role] = ReducedFigures(
                q.path, q.bytes, q.top1_agreement,
                runtime.accuracy(q_file, data.batches("val", VALIDATION_ROWS)) if data.has_labels else None,
                runtime.latency(q_file, timing))
    return (result, onnx, LatencyPair(before, after, ratio(before.median, after.median)),
            LatencyPair(*mobile, ratio(mobile[0].median, mobile[1].median)), reduced)


def compress(options: CompressOptions, events: Events | None = None) -> Report | None:
    """Compress a checkpoint end to end; returns the report (also stored in the output checkpoint).

    Every option and output is checked before any work; nothing is written unless everything
    succeeds, and then all files are renamed into place together. Under ``torchrun`` every process
    calls this; rank 0 writes and returns the report, the others return None
    (:mod:`compressor.distributed`)."""
    check_instance("compress(options)", options, CompressOptions)
    if events is not None:
        check_instance("compress(events)", events, Events)
    options.validate()
    _check_device(options.finetune.device)
    world = world_from_environment(options.finetune.device)
    try:
        return _compress(options, events if events is not None and world.is_main else Events(), world)
    except KeyboardInterrupt as exc:  # outside the fine-tune (which raises Interrupted itself): export, timing
        raise _interrupted(options) from exc
    finally:
        world.close()


def _interrupted(options: CompressOptions) -> Interrupted:
    """Ctrl-C outside the fine-tune (loading, exporting, timing): nothing was written; a resume state the
    fine-tune kept is named."""
    checkpoint = compress_outputs(Path(options.source.checkpoint), options.output, quantize=False,
                                  ort_format=False)["checkpoint"]
    return interrupted("outside the fine-tune", resume_path(checkpoint) if options.finetune.resume else None)


def _stale_resume_notes(options: CompressOptions, checkpoint: Path) -> list[str]:
    """A resume state an earlier, interrupted run left beside this run's output (this run did not use it)."""
    stale = resume_path(checkpoint)
    if options.finetune.resume or not stale.is_file():
        return []
    return [f"{stale}, the resume state of an earlier interrupted run, is still there; only --resume reads it: "
            "delete it unless you mean to continue that run"]


def _resumed_latency_verdict(options: CompressOptions, checkpoint: Path) -> dict[str, str] | None:
    """The layers an interrupted ``--objective latency`` run kept dense, from its resume state (read only
    for that objective with ``--resume``: no other run has a verdict to reuse)."""
    if not (options.finetune.resume and options.plan.objective == "latency"):
        return None
    return saved_latency_verdict(resume_path(checkpoint))


def _resume_file(options: CompressOptions, loaded: LoadedModel, data: DataSource, checkpoint: Path,
                 world: World, kept_for_latency: dict[str, str]) -> ResumeFile | None:
    """Where ``--resume`` keeps the fine-tune state (``<output>.resume.pt``), what identifies the run, and
    the layers ``--objective latency`` kept dense (a resumed run keeps the same ones)."""
    if not options.finetune.resume:
        return None
    return ResumeFile(resume_path(checkpoint), _run_fingerprint(options, loaded, data, world), options.finetune.save_every,
                      kept_for_latency)


RESUME_FREE = ("max_time", "resume", "save_every")
"""Fine-tune options a resumed run may change: when it stops and how it keeps its state, not what it computes."""


def _run_fingerprint(options: CompressOptions, loaded: LoadedModel, data: DataSource, world: World) -> dict:
    """What a resumed run must share with the run that wrote the state: the model's bytes (its SHA-256:
    a retrained checkpoint of the same size is another model), the data (each file's place, size and
    modification time, a shard directory's files one by one; hashing gigabytes of data would cost more
    than the resume saves), the process count, the seed and every plan and fine-tune option that
    shapes the result. Plain JSON values, as a weights-only resume state can hold them."""
    tuning = {k: v for k, v in asdict(options.finetune).items() if k not in RESUME_FREE}
    fingerprint = {"model_sha256": _sha256(loaded.path), "data": str(data.source), "data_files": _file_stamps(data.files),
                   "world_size": world.size, "seed": options.seed,
                   **{f"plan.{k}": v for k, v in asdict(options.plan).items()}, **{f"finetune.{k}": v for k, v in tuning.items()}}
    return json.loads(json.dumps(fingerprint, default=str))  # numpy numbers and tuples as plain numbers and lists


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_stamps(paths) -> dict[str, list[int]]:
    """(size, modification time) of each file, a directory's files one by one, by resolved path."""
    files = [f for p in map(Path, paths) for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    return {str(f.resolve()): [stat.st_size, stat.st_mtime_ns] for f in files for stat in [f.stat()]}


def _training_data(loaded: LoadedModel, options: CompressOptions) -> DataSource:
    """The data to fine-tune on, checked against the model and against ``--mixup``."""
    data = _data_for(loaded, options.source.data, options.seed,
                     {"train": CALIBRATION_ROWS, "val": max(VALIDATION_ROWS, options.export.latency_batch)},
                     selection=options.plan.max_drop is not None)
    if options.finetune.mixup and not data.random_access:
        raise UsageError(f"--mixup draws partner rows by index, and {data.source} is a stream (IterableDataset) "
                         "without random access; drop --mixup or give a Dataset or array file")
    if options.finetune.mixup and not data.input_dtype.is_floating_point:
        raise UsageError(f"--mixup interpolates input rows, and this model takes integer inputs "
                         f"({dtype_name(data.input_dtype)}: token ids or integer images) from "
                         f"{data.source}; drop --mixup")
    return data


def _reloadable(loaded: LoadedModel) -> LoadedModel:
    """``loaded``, which must name its architecture: a compressed checkpoint is rebuilt from it."""
    if loaded.arch is None:
        raise UsageError(f"{loaded.path} is a whole pickled model with no architecture reference, so its compressed "
                         "checkpoint could not be reloaded safely; also pass --arch package.module:factory naming "
                         "its architecture")
    return loaded


def _compress_warnings(data: DataSource, plan: list[LayerPlan], options: CompressOptions, accuracy: Accuracy | None,
                       tuned: FinetuneResult, latency: LatencyPair, mobile: LatencyPair) -> list[str]:
    """Everything about a compress's result that the user should know before deploying it."""
    return [*data.notes, *_headless_warnings(plan, options.plan), *_growth_warnings(plan),
            *_warnings(accuracy, tuned, options.plan.max_drop), *_few_held_out(accuracy, data.val_rows),
            *_slower_warnings(latency, mobile)]


def _compress(options: CompressOptions, events: Events, world: World) -> Report | None:
    started = time.monotonic()
    with world.stage():
        events.stage(f"Loading {options.source.checkpoint}")
        loaded = _reloadable(_load_uncompressed(options.source))
        data = _training_data(loaded, options)
        paths = compress_outputs(loaded.path, options.output, quantize=bool(options.export.quantize),
                                 ort_format=options.export.ort_format, fp16=options.export.precision == "fp16")
        inputs = _inputs(loaded, data)
        if options.finetune.resume:
            check_resume_path(resume_path(paths["checkpoint"]), inputs)
        plan, costs, kept_for_latency = _plan(loaded, example := _example(data), options, measure_cost=False, world=world,
                                              verdict=_resumed_latency_verdict(options, paths["checkpoint"]))
        if not any(entry.replaced for entry in plan):
            raise PlanError(NOTHING_FASTER)
        artifacts = Artifacts(paths, inputs, options.force) if world.is_main else None
        if artifacts is not None:
            artifacts.check()
        if not data.random_access:
            events.stage("Sizing the stream (its len(), else one reading pass)")
            data.training_rows(seconds=options.finetune.max_time)
        options = replace(options, finetune=resolved_options(options.finetune, data))
        resume = _resume_file(options, loaded, data, paths["checkpoint"], world, kept_for_latency)
        samples = data.head("val", VALIDATION_ROWS)[0] if world.is_main else None  # validation rows, read once
        original_bytes = _original_onnx(loaded.model, samples, options, events) if world.is_main else b""
    with artifacts if artifacts is not None else contextlib.nullcontext():
        with world.stage():
            original = loaded.model
            plan, compressed, formats, notes, tuned, accuracy = _compress_within_budget(
                original, plan, data, options, events, world, resume,
                replan=lambda keep: _replan(loaded, example, options, {**kept_for_latency, **keep}))
        with world.stage():
            if not world.is_main:
                return None
            exported, onnx, latency, mobile, reduced = _export(original, original_bytes, compressed, samples, data,
                                                               options, artifacts, formats, events)
            report = Report(
                model=str(options.source.checkpoint), output=str(paths["checkpoint"]), options=_options_summary(options),
                data=DataSummary(data.source, int(data.training_rows()), int(data.val_rows or 0), data.has_labels),
                params=_params(original, plan), layers=_rows(plan, costs),
                finetune=FinetuneSummary(len(tuned.epochs), tuned.steps, tuned.stopped_by,
                                         round(tuned.epochs[-1].seconds, 2) if tuned.epochs else 0.0, world.size,
                                         round(tuned.samples_per_second, 1)),
                accuracy=accuracy, onnx=onnx, latency=latency, int8=reduced.get("int8"),
                warnings=_compress_warnings(data, plan, options, accuracy, tuned, latency, mobile),
                notes=[*notes, *_probability_notes(tuned), *exported.notes,
                       *_stale_resume_notes(options, paths["checkpoint"])],
                seconds=round(time.monotonic() - started, 2), mobile_latency=mobile, fp16=reduced.get("fp16"))
            events.stage(f"Saving {paths['checkpoint']}")
            payload = compressed_payload(loaded, plan, compressed, report, _data_reference(data, paths["checkpoint"]))
            artifacts.write("checkpoint", lambda tmp: torch.save(payload, tmp))
            artifacts.commit(final=True)
            if resume is not None:
                resume.path.unlink(missing_ok=True)
    return report


def _options_summary(options: CompressOptions) -> dict:
    """The options that shaped the result, as plain values (the report's ``options``)."""
    plan, tune, export = options.plan, options.finetune, options.export
    return {"head": plan.head, "hidden": plan.hidden, "depth": plan.depth, "objective": plan.objective,
            "include": list(plan.include), "exclude": list(plan.exclude), "max_drop": plan.max_drop,
            "init": tune.init, "seed": options.seed, "epochs": tune.epochs, "max_time": tune.max_time, "lr": tune.lr,
            "batch_size": tune.batch_size, "temperature": tune.temperature, "device": tune.device, "amp": tune.amp,
            "update_norm_stats": tune.update_norm_stats, "mixup": tune.mixup, "quantize": export.quantize,
            "precision": export.precision, "ort": export.ort_format, "tolerance": export.tolerance,
            "latency_batch": export.latency_batch, "dynamic_tokens": export.dynamic_tokens}


def load_compressed_model(path: str | Path, *, arch: Architecture | None = None) -> nn.Module:
    """A compressed model back in one line (eval mode): ``load_compressed_model("mlp.fixclf.pt")``.

    ``arch`` is needed only when the original architecture is not built into fixclf: the same
    ``"package.module:factory"`` used to compress it, or the factory itself (e.g. a torchvision builder)."""
    check_file_name("load_compressed_model(path)", path)
    return load_compressed(path, arch=arch).model


def load_report(path: str | Path | None = None) -> Report:
    """The report stored in a compressed checkpoint (None: the newest ``*.fixclf.pt`` in the current
    directory). Reads the checkpoint only: the model is neither built nor imported."""
    if path is None:
        path = latest_compressed(".")
        if path is None:
            raise UsageError("no *.fixclf.pt in this directory; pass the compressed checkpoint: fixclf report PATH")
    check_file_name("load_report(path)", path)
    return read_stored_report(path)


def export_checkpoint(command: ExportCommand) -> ExportResult:
    """Export any accepted checkpoint (dense or compressed) to validated ONNX at ``command.output``.

    A compressed checkpoint of an architecture that is not built in needs ``source.arch`` again."""
    check_instance("export_checkpoint(command)", command, ExportCommand)
    command.validate()
    loaded = _load(command.source)
    data = _data_for(loaded, command.source.data, command.seed, {"val": VALIDATION_ROWS},
                     needed_for="to validate the ONNX export")
    output = Path(command.output)
    requested = {main_format(command.export.quantize, command.export.precision): "onnx"}
    requested |= {"ort": "ort"} if command.export.ort_format else {}
    formats, notes = choose_formats(loaded.model, requested)
    with Artifacts(export_outputs(output, ort_format=command.export.ort_format), _inputs(loaded, data),
                   command.force) as artifacts:
        artifacts.check()
        result = write_exports(loaded.model, data.head("val", VALIDATION_ROWS)[0], artifacts, formats,
                               tolerance=command.export.tolerance,
                               spec=ExportSpec(dynamic_tokens=command.export.dynamic_tokens))
        artifacts.commit(final=True)
    result.notes = notes + result.notes
    return result
