"""fixclf command line: parse options into compressor's options tree, call one library function, print.

Progress (on a terminal, or with ``FIXCLF_PROGRESS=1``) and errors go to stderr, results to stdout (a rich table, or JSON with ``--json``: then
stdout carries the JSON alone, whatever the user's model code prints while it runs). Every
failure ends with one line ``error: <what; what to do>`` and the exit code of its class
(:mod:`compressor.errors`): 2 for usage errors, click's own included; 130 for Ctrl-C or SIGTERM at
any moment, the imports included. ``--debug`` also prints the traceback (same exit codes). The entry point is
:func:`run`; heavy modules (torch, onnx) are imported only inside it, so that all of that holds
from the first instant.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from cli import entry
from compressor.errors import FixclfError, Interrupted, OutputError, UsageError, exited_in_user_code
from compressor.options import (BUDGET_STEPS, CompressOptions, ExportOptions, FinetuneOptions, PlanOptions, SourceOptions)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress trained PyTorch classifiers: fixed Hadamard head, ACDC / Fastfood hidden layers, "
    "brief distillation, validated ONNX. Exit codes: 2 usage, 3 checkpoint, 4 data, 5 plan, 6 fine-tuning, "
    "7 export, 8 output, 130 interrupted.",
)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
STATE = {"debug": False, "reported": False}
DEFAULTS = CompressOptions()  # every default is declared once, in compressor.options
PLAN, TUNE, EXPORT = DEFAULTS.plan, DEFAULTS.finetune, DEFAULTS.export


def _one_line(text: str) -> str:
    """Printable text on one line: control characters (newlines, terminal escapes) become spaces."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _is_rank_zero() -> bool:
    """Under torchrun only rank 0 prints (results and errors): every process exits with the same code.
    A RANK without a WORLD_SIZE of several processes is a single-process run, which prints."""
    return os.environ.get("RANK", "0") in ("0", "") or not entry.one_of_several_processes()


def _error(message: str, code: int, heard_only_here: bool = False) -> int:
    """Print ``error: message`` (on rank 0, or on any process for an error the others never heard of); return ``code``."""
    STATE["reported"] = True
    if _is_rank_zero() or heard_only_here:
        err.print(f"error: {_one_line(message)}", style="red", highlight=False, markup=False, soft_wrap=True)
    return code


@contextlib.contextmanager
def _stdout_to_stderr():
    """While the library runs, anything written to stdout (by user model code, C libraries) goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _call(work: Callable[[], object], show: Callable[[object], None], as_json: bool) -> None:
    """Run a command's work (option checks, imports, the library call) with stdout kept clean, then print
    its result (JSON or ``show``). Any failure becomes one ``error:`` line and the exit code."""
    try:
        with _stdout_to_stderr():
            result = work()
        entry.ignore_late_signals()  # the work is done and committed: a late Ctrl-C must not report it lost
    except SystemExit as exc:  # the library never exits: the model's own code did (its forward, a hook)
        raise typer.Exit(_exit_code(exited_in_user_code(exc))) from None
    except BaseException as exc:  # noqa: BLE001 - the one place a command's failure becomes one line
        raise typer.Exit(_exit_code(exc)) from None
    if result is None:  # a torchrun process other than rank 0
        return
    try:
        if as_json:
            sys.stdout.write(json.dumps(result if isinstance(result, dict) else result.to_dict(), indent=2) + "\n")
        else:
            show(result)
        sys.stdout.flush()
    except SystemExit:  # rich's Console met a reader that stopped reading and ended the process its way
        raise typer.Exit(128 + signal.SIGPIPE) from None
    except OSError as exc:  # a full disk behind `> file`, a reader that stopped reading (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        if isinstance(exc, BrokenPipeError):  # as a command killed by SIGPIPE ends: quietly
            raise typer.Exit(128 + signal.SIGPIPE) from None
        raise typer.Exit(_exit_code(OutputError(f"writing to standard output failed ({exc.strerror or exc}); the command's "
                                                "work is done: write its output somewhere with room"))) from None


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Also print the traceback of an error (the exit code stays the documented one).")) -> None:
    STATE["debug"] = debug


def _progress_wanted(as_json: bool) -> bool:
    """Progress lines on a terminal (not with ``--json``); ``FIXCLF_PROGRESS=1`` forces them (logs, also
    with ``--json``: they go to stderr), ``=0`` hides them."""
    forced = os.environ.get("FIXCLF_PROGRESS")
    return err.is_terminal and not as_json if forced is None else forced == "1"


def _arch_kwargs(text: Optional[str]) -> Optional[dict]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs is not valid JSON ({exc.msg}); example: '{{\"hidden\": 256}}'") from exc
    except (RecursionError, ValueError) as exc:  # nested too deep, or an integer of thousands of digits
        raise UsageError("--arch-kwargs is too deeply nested or holds an oversized number; give plain keyword "
                         "arguments, e.g. '{\"hidden\": 256}'") from exc
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": 256}'")
    return value


def _source(checkpoint: Path, arch, arch_kwargs, trust_pickle, data=None) -> SourceOptions:
    return SourceOptions(checkpoint, arch, _arch_kwargs(arch_kwargs), trust_pickle, data)


ARCH = typer.Option(None, "--arch", help="Architecture as package.module:factory (needed for a bare state_dict, to "
                    "confirm one a checkpoint names that is not built into fixclf, and again to export or reload such a "
                    "compressed checkpoint). The current directory is searched first, as python -m does.")
ARCH_KW = typer.Option(None, "--arch-kwargs", help="JSON object of keyword arguments for --arch (needs --arch).")
TRUST = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that is a whole pickled model (runs code from the file).")
HEAD = typer.Option(PLAN.head, "--head", help="Replacement of the classification layer: hadamard, orthogonal or keep "
                   "(a head of more classes than features stays dense unless a Linear feeds it directly).")
HIDDEN = typer.Option(PLAN.hidden, "--hidden", help="Replacement of hidden Linear layers: acdc, fastfood or keep.")
DEPTH = typer.Option(PLAN.depth, "--depth", help="ACDC layers per replaced Linear (K, 1-64); the one layer feeding a "
                     "head of C classes on N < C features gets ceil(C/N) times as many.")
INCLUDE = typer.Option(None, "--include", help="Replace only Linear layers whose name matches (glob; repeatable).")
EXCLUDE = typer.Option(None, "--exclude", help="Keep Linear layers whose name matches (glob; repeatable).")
SEED = typer.Option(DEFAULTS.seed, "--seed", help="Seed (0 to 2^32-1) of the fixed permutations, signs, initialisation and data order.")
JSON_OUT = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (and nothing else).")
QUANTIZE = typer.Option(EXPORT.quantize, "--quantize", help="int8: also write an int8 ONNX file (compress) or write "
                        "int8 (export): dynamic quantisation of the dense layers left. With none left, the float file is "
                        "kept and the report says so.")
PRECISION = typer.Option(EXPORT.precision, "--precision", help="fp16: also write a float16 ONNX file (compress) or "
                         "write float16 (export), accepted on >= 99% top-1 agreement with float32. fp32: float32 only.")
ORT_FORMAT = typer.Option(EXPORT.ort_format, "--ort", help="Also write ONNX Runtime's mobile format (.ort); check it.")
TOLERANCE = typer.Option(EXPORT.tolerance, "--tolerance", help="Max relative |ONNX - PyTorch| accepted at export.")
DYNAMIC_TOKENS = typer.Option(EXPORT.dynamic_tokens, "--dynamic-tokens", help="The ONNX file takes any sequence length "
                              "(axis 1 of token ids (batch, tokens) or token features (batch, tokens, features)); "
                              "refused where the model fixes its length.")
FORCE = typer.Option(DEFAULTS.force, "--force", help="Overwrite existing outputs (never an input file).")
OBJECTIVE = typer.Option(PLAN.objective, "--objective", help="size: replace every planned layer; latency: keep dense "
                         "each layer whose replacement is slower alone in ONNX Runtime at batch 1 at the model's shapes.")
LATENCY_BATCH = typer.Option(EXPORT.latency_batch, "--latency-batch", help="Batch size of the latency measurement.")
INIT = typer.Option(TUNE.init, "--init", help="Hidden layers start from the papers' initialisation (thesis: each ACDC "
                    "layer near identity, Fastfood random) or are first fitted to the dense layers by least squares (fit).")
TRAIN_DATA = typer.Option(None, "--data", help="Data: .npz/.pt with x (and y, x_val, y_val, x_select, y_select), a "
                          "directory of .npy/.npz shards (read lazily), or package.module:function returning arrays, a "
                          "Dataset or an IterableDataset. Not needed for checkpoints that bundle data (the samples).")
EPOCHS = typer.Option(TUNE.epochs, "--epochs", help="Fine-tuning epochs (at most). Default: the fewest epochs with at "
                      f"least {BUDGET_STEPS:,} optimiser steps.")
CHECKPOINT = typer.Argument(..., help="Trained checkpoint (.pt).")
MAX_TIME = typer.Option(TUNE.max_time, "--max-time", help="Fine-tuning time budget in seconds (checked every step).")
LR = typer.Option(TUNE.lr, "--lr", help="Fine-tuning learning rate of the new layers (Adam).")
NORM_STATS = typer.Option(TUNE.update_norm_stats, "--update-norm-stats", help="Let kept BatchNorm layers update their "
                          "running statistics during fine-tuning (default: kept as trained).")
MIXUP = typer.Option(TUNE.mixup, "--mixup/--no-mixup", help="Distil on mixed rows w x + (1 - w) x' (w ~ U(0, 1), x' "
                     "another row of the batch): keeps the student from re-learning the teacher's memorised noise "
                     "(docs/hard_samples.md). Default: on, except for streams (no random access).")
BATCH = typer.Option(TUNE.batch_size, "--batch-size", help="Fine-tuning batch (global: under torchrun it is split "
                     "among the processes, so N processes take the same steps as one).")
RESUME = typer.Option(TUNE.resume, "--resume", help="Keep the fine-tune state in <output>.resume.pt (every epoch) and "
                      "continue from it if it is there; removed once the outputs are written.")
SAVE_EVERY = typer.Option(TUNE.save_every, "--save-every", help="With --resume: also keep the state every N steps.")
NPROC = typer.Option(1, "--nproc", help="Fine-tune in N processes on this machine (DDP; the same as torchrun "
                     "--standalone --nproc_per_node=N $(which fixclf) compress ...).")
AMP = typer.Option(TUNE.amp, "--amp/--no-amp", help="On CUDA, fine-tune under autocast (bf16 where supported, else "
                   "fp16 with gradient scaling).")
OUTPUT = typer.Option(DEFAULTS.output, "--output", "-o", help="Compressed checkpoint to write (.pt); the .onnx goes "
                      "beside it. Default: ./<name>.fixclf.pt")
DEVICE = typer.Option(TUNE.device, "--device", help="Fine-tuning device: cpu, cuda or cuda:N.")
MAX_DROP = typer.Option(PLAN.max_drop, "--max-drop", help="Accuracy (percentage points) the model may lose: the "
                        "costliest replaced layers are kept dense, one at a time, until the loss plus 1.645 standard errors fits "
                        "(else the most-replaced plan whose loss alone fits, with a note), judged on rows set aside from "
                        "training (x_select/y_select, else 10%), never on the held-out rows the report quotes.")


@app.command()
def compress(
    checkpoint: Path = CHECKPOINT, head: str = HEAD, hidden: str = HIDDEN, depth: int = DEPTH, init: str = INIT,
    data: Optional[str] = TRAIN_DATA, epochs: Optional[int] = EPOCHS, max_time: Optional[float] = MAX_TIME, lr: float = LR,
    update_norm_stats: bool = NORM_STATS, mixup: Optional[bool] = MIXUP, batch_size: int = BATCH, resume: bool = RESUME,
    save_every: Optional[int] = SAVE_EVERY, nproc: int = NPROC, amp: bool = AMP,
    include: Optional[List[str]] = INCLUDE, exclude: Optional[List[str]] = EXCLUDE, output: Optional[Path] = OUTPUT,
    seed: int = SEED, device: str = DEVICE, quantize: Optional[str] = QUANTIZE, precision: str = PRECISION,
    ort_format: bool = ORT_FORMAT, tolerance: float = TOLERANCE, latency_batch: int = LATENCY_BATCH,
    dynamic_tokens: bool = DYNAMIC_TOKENS, objective: str = OBJECTIVE, max_drop: Optional[float] = MAX_DROP, force: bool = FORCE,
    arch: Optional[str] = ARCH, arch_kwargs: Optional[str] = ARCH_KW, trust_pickle: bool = TRUST,
    as_json: bool = JSON_OUT,
) -> None:
    """Replace the head and hidden FC layers, fine-tune by distillation, save, export ONNX and report."""
    options = lambda: CompressOptions(  # noqa: E731 - built inside the work, where its errors become one line
        source=_source(checkpoint, arch, arch_kwargs, trust_pickle, data),
        plan=PlanOptions(head, hidden, depth, include or [], exclude or [], objective, max_drop),
        finetune=FinetuneOptions(epochs=epochs, max_time=max_time, lr=lr, batch_size=batch_size, init=init,
                                 device=device, update_norm_stats=update_norm_stats, mixup=mixup, amp=amp, resume=resume,
                                 save_every=save_every),
        export=ExportOptions(quantize, ort_format, tolerance, latency_batch, precision, dynamic_tokens),
        output=output, seed=seed, force=force,
    )
    if nproc != 1:
        raise typer.Exit(_launch(nproc, options))

    def work():
        tree = options()
        tree.validate()
        from cli.render import RichEvents
        import compressor

        events = RichEvents(err, quiet=not _progress_wanted(as_json))
        try:
            return compressor.compress(tree, events)
        finally:
            events.close()

    _call(work, _show("print_report"), as_json)


@app.command()
def plan(
    checkpoint: Path = CHECKPOINT,
    head: str = HEAD,
    hidden: str = HIDDEN,
    depth: int = DEPTH,
    include: Optional[List[str]] = INCLUDE,
    exclude: Optional[List[str]] = EXCLUDE,
    objective: str = OBJECTIVE,
    data: Optional[str] = typer.Option(None, "--data", help="Inputs that show each layer's real shape (token axes "
                                       "included) to time it; default: the checkpoint's bundled data, if any."),
    latency_batch: int = LATENCY_BATCH,
    seed: int = SEED,
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KW,
    trust_pickle: bool = TRUST,
    as_json: bool = JSON_OUT,
) -> None:
    """Show which layers compress would replace by what, the stored numbers and, with data, each layer's ONNX
    Runtime latency alone (dense vs structured, batch 1 on 1 thread and --latency-batch on 2); changes nothing."""
    def work():
        import compressor

        return compressor.plan_checkpoint(CompressOptions(
            source=_source(checkpoint, arch, arch_kwargs, trust_pickle, data),
            plan=PlanOptions(head, hidden, depth, include or [], exclude or [], objective),
            export=ExportOptions(latency_batch=latency_batch), seed=seed))

    _call(work, _show("print_plan"), as_json)


@app.command()
def report(
    path: Optional[Path] = typer.Argument(None, help="Compressed checkpoint; default: the newest *.fixclf.pt here. "
                                          "Reads the stored report only: no --arch needed."),
    as_json: bool = JSON_OUT,
) -> None:
    """Print the report of a compressed checkpoint: layers, parameters, ONNX bytes, accuracy, latency."""
    def work():
        import compressor

        return compressor.load_report(path)

    _call(work, _show("print_report"), as_json)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to export (dense or compressed)."),
    output: Path = typer.Option(..., "--output", "-o", help="ONNX file to write."),
    data: Optional[str] = typer.Option(None, "--data", help="Inputs to validate the export on (default: the checkpoint's "
                                       "bundled data)."),
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KW,
    trust_pickle: bool = TRUST,
    quantize: Optional[str] = QUANTIZE,
    precision: str = PRECISION,
    ort_format: bool = ORT_FORMAT,
    tolerance: float = TOLERANCE,
    dynamic_tokens: bool = DYNAMIC_TOKENS,
    force: bool = FORCE,
    seed: int = SEED,
    as_json: bool = JSON_OUT,
) -> None:
    """Export a checkpoint to ONNX (opset 18, dynamic batch; --dynamic-tokens: any sequence length too),
    validated against PyTorch in ONNX Runtime.

    A compressed checkpoint of an architecture that is not built into fixclf needs the same --arch
    that compressed it."""
    def work():
        import compressor

        command = compressor.ExportCommand(_source(checkpoint, arch, arch_kwargs, trust_pickle, data), output,
                                           ExportOptions(quantize, ort_format, tolerance, precision=precision,
                                                         dynamic_tokens=dynamic_tokens),
                                           force, seed)
        return compressor.export_checkpoint(command)

    _call(work, _show("print_export"), as_json)


def _without_nproc(args: List[str]) -> List[str]:
    """The command line as given, less ``--nproc N`` / ``--nproc=N``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _launch(processes: int, options: Callable[[], CompressOptions]) -> int:
    """``compress --nproc N``: check everything once here, then run the command as N processes
    (:func:`compressor.distributed.launch`); their rank 0 prints. Returns the exit code."""
    try:
        if not 1 <= processes <= 256:
            raise UsageError(f"--nproc must be an integer in [1, 256], got {processes}")
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise UsageError("--nproc inside a torchrun job: drop --nproc (torchrun already started the processes)")
        if "args" not in STATE:
            raise UsageError("--nproc needs the fixclf command line (run fixclf, not the typer app)")
        options().validate()
        from compressor.distributed import launch

        return launch(_without_nproc(STATE["args"]), processes)
    except BaseException as exc:  # noqa: BLE001 - one line, as every command
        return _exit_code(exc)


def _show(name: str) -> Callable[[object], None]:
    """The renderer ``name`` of :mod:`cli.render` (imported only when there is something to show)."""
    def show(result) -> None:
        from cli import render

        getattr(render, name)(result)
    return show


def _exit_code(exc: BaseException) -> int:
    """Print one ``error:`` line for any failure; return its exit code. The outcome is decided here (the
    library has cleaned up): a signal now would only cut the line short (and leave rich's output
    buffer holding every later line), so late signals are ignored from here on."""
    entry.ignore_late_signals()
    if STATE["debug"] and not isinstance(exc, (typer.Exit, SystemExit)):
        traceback.print_exception(exc, file=sys.stderr)
    interrupted = isinstance(exc, (Interrupted, KeyboardInterrupt, typer.Abort)) or entry.STATE["signalled"]
    if interrupted and entry.launched_by_fixclf():  # the --nproc launcher prints the one line for every process
        return Interrupted.exit_code
    if isinstance(exc, Interrupted):
        return _error(str(exc), exc.exit_code)
    if interrupted:
        return _error("interrupted; nothing was written", Interrupted.exit_code)
    if isinstance(exc, FixclfError):
        return _error(str(exc), exc.exit_code, getattr(exc, "heard_only_here", False))
    if isinstance(exc, typer.Exit):
        return exc.exit_code
    if isinstance(exc, SystemExit) and (exc.code is None or isinstance(exc.code, int)):
        return exc.code or 0  # click's quiet answer to a closed pipe (`fixclf ... | head`), or a plain sys.exit
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click's (typer's) own usage errors
        ctx = getattr(exc, "ctx", None)
        hint = f"; see fixclf {ctx.command.name} --help" if ctx is not None and ctx.command is not None else ""
        message = " ".join(exc.format_message().split()).rstrip(".") or "no command given (compress, plan, report or export)"
        return _error(message + hint, 2)
    return _error(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; rerun with --debug and "
                  "report it", 1)


def run(args: List[str]) -> int:
    """Parse ``args`` and run the command; every failure is one line. Returns the exit code.
    ``--debug`` is the app's option, but is accepted anywhere (``fixclf plan m.pt --debug``)."""
    STATE["debug"] = "--debug" in args
    if STATE["debug"]:
        args = ["--debug", *[a for a in args if a != "--debug"]]
    STATE["args"] = list(args)
    try:
        code = app(args=args, prog_name="fixclf", standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - parse errors, Ctrl-C between commands
        return _exit_code(exc)
    if code == Interrupted.exit_code and not STATE["reported"]:  # typer turned a Ctrl-C into Exit(130)
        return _exit_code(KeyboardInterrupt())
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    from cli.entry import main as _main

    _main()
