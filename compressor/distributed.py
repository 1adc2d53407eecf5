"""Running one ``compress`` as N processes under ``torchrun`` (torch.distributed, DDP).

``torchrun --standalone --nproc_per_node=N $(which fixclf) compress ...`` starts N copies of the
command; torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Every process loads, plans and
initialises the same model (every random choice is seeded, and :meth:`World.check_identical`
verifies the states agree), fine-tunes its share of each global batch under
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA, one GPU per process), and only rank 0
evaluates, exports, writes and prints.

Failures: every synchronisation point is one :meth:`World.sync` (an all-gather of each process's
outcome); the pipeline is cut into stages (:meth:`World.stage`) that end in one, and the fine-tune
loop syncs after every step's forward pass. A process that fails anywhere reports at its next
sync, which meets the others at theirs, so every process raises the first failing rank's error
(same exit code; only rank 0 prints it) and none waits forever.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import FixclfError, Interrupted, UsageError, exited_in_user_code

__all__ = ["World", "world_from_environment", "launch", "heard_only_here", "DistributedError", "RemoteError"]

TIMEOUT = timedelta(minutes=30)  # the longest a process waits for the others (rank 0 exports meanwhile)
RENDEZVOUS_S = 300.0  # the longest a process waits for the others to start (torchrun starts them together)
POLL_S = 0.05  # how often the rendezvous looks again; Python runs signal handlers in between
GRACE_SECONDS = 30  # after one process fails, how long the others get to report the same error and exit


class DistributedError(FixclfError):
    """Another process of the job failed in a way that could not be reported (it died)."""

    exit_code = 1


@dataclass
class World:
    """This process's place in the job: ``rank`` of ``size`` processes (``size`` 1: no torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, requested: str) -> str:
        """The device of this process: ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``)."""
        return f"cuda:{self.local_rank}" if self.distributed and requested == "cuda" else requested

    def sync(self, payload: object = None, error: FixclfError | None = None) -> list:
        """The one collective of fixclf's own (DDP's gradient all-reduce aside): every process sends
        ``payload`` or its ``error`` and receives everyone's. Raises ``error`` if given, else the
        first other process's error (as :class:`RemoteError`, same exit code); returns the payloads.

        Because every synchronisation point is this same call, a process that fails anywhere and
        reports here meets the others wherever they next synchronise: nobody waits forever."""
        if not self.distributed:
            if error is not None:
                raise error
            return [payload]
        outcomes: list = [None] * self.size
        mine = ("ok", payload) if error is None else ("error", (error.exit_code, str(error)))
        try:
            dist.all_gather_object(outcomes, mine)
        except Exception as exc:
            if error is not None:  # this process's own error, which the others never heard of
                raise heard_only_here(error, self.rank) from exc
            raise heard_only_here(DistributedError(f"lost contact with the other processes ({type(exc).__name__}); one "
                                                   "of them stopped: see its output"), self.rank) from exc
        if error is not None:
            error.agreed = True  # every process knows it now: stage() must not report it again
            raise error
        for rank, (kind, value) in enumerate(outcomes):
            if kind == "error":
                code, message = value
                raised = RemoteError(message if rank == 0 else f"rank {rank}: {message}")
                raised.exit_code = code
                raise raised
        return [value for _, value in outcomes]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (a :meth:`sync`)."""
        return [sum(column) for column in zip(*self.sync(values))]

    def check_identical(self, state: dict[str, torch.Tensor]) -> None:
        """Raise unless every process holds the same ``state`` (a float64 checksum per tensor)."""
        sums = [(float(t.detach().double().sum()), float(t.detach().double().abs().sum())) for t in state.values()]
        if any(other != sums for other in self.sync(sums)):
            raise DistributedError("the processes built different models (an unseeded random choice in the "
                                   "architecture factory?); make the model's construction deterministic")

    @contextmanager
    def stage(self) -> Iterator[None]:
        """Run a stage on every process, then :meth:`sync`: if any failed, all raise the first failure."""
        try:
            yield
        except (KeyboardInterrupt, Interrupted, RemoteError):
            raise  # interrupts do not wait (torchrun stops every process); a RemoteError was agreed already
        except FixclfError as exc:
            if getattr(exc, "agreed", False):  # raised by a sync inside the stage (the fine-tune's step): reported
                raise
            self.sync(error=exc)
        except SystemExit as exc:  # the model's own code on this process only: the others must hear of it
            self.sync(error=exited_in_user_code(exc))
        except Exception as exc:
            if not self.distributed:
                raise
            self.sync(error=DistributedError(f"rank {self.rank} failed: {type(exc).__name__}: "
                                             f"{(str(exc).splitlines() or [''])[0][:200]}"))
        else:
            self.sync()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class RemoteError(FixclfError):
    """Another process's error, raised here too so that every process exits with its code."""


def _whole_number(variable: str, default: str | None) -> int:
    """The environment variable torchrun sets, as an int (UsageError when it is not one)."""
    value = os.environ.get(variable, default) or default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"the environment variable {variable}={os.environ.get(variable, '')!r} is not a whole number "
                         "(torchrun sets it); unset WORLD_SIZE to run as one process, or start fixclf with torchrun "
                         "or --nproc") from None


def heard_only_here(error: FixclfError, rank: int | None = None) -> FixclfError:
    """Mark ``error`` as this process's alone, which no other process heard of (its environment was
    wrong, or it lost the others): only rank 0 prints an agreed error, but this one every process
    prints itself (prefixed with its ``rank`` where known), else a non-zero rank would exit silently."""
    if rank is not None:
        error = type(error)(f"rank {rank}: {error}")
    error.heard_only_here = True
    return error


def world_from_environment(device: str) -> World:
    """The job this process belongs to (from torchrun's environment); joins its process group. Its
    errors are this process's alone (:func:`heard_only_here`)."""
    try:
        return _join(device)
    except FixclfError as exc:
        rank = os.environ.get("RANK", "")
        if not rank.isdigit():
            raise heard_only_here(exc)
        raise heard_only_here(exc, int(rank)) from exc


def _join(device: str) -> World:
    size = _whole_number("WORLD_SIZE", "1")
    if size <= 1:
        return World()
    world = World(_whole_number("RANK", None), size, _whole_number("LOCAL_RANK", "0"))
    if not 0 <= world.rank < size:
        raise UsageError(f"the environment says RANK={world.rank} of WORLD_SIZE={size}, but ranks run from 0 to {size - 1} "
                         "(torchrun sets both); unset WORLD_SIZE to run as one process, or start fixclf with torchrun "
                         "or --nproc")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={size} is set but {' and '.join(missing)} not (torchrun sets them); unset WORLD_SIZE "
                         "to run as one process, or start fixclf with torchrun or --nproc")
    if device.startswith("cuda"):
        if not torch.cuda.is_available() or torch.cuda.device_count() <= world.local_rank:
            raise UsageError(f"--device cuda under torchrun needs one GPU per process; this machine has "
                             f"{torch.cuda.device_count()}: use --device cpu or fewer processes")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        port = _whole_number("MASTER_PORT", None)
        if not 0 < port < 2**16:
            raise UsageError(f"MASTER_PORT={port} is not a TCP port (1-65535); torchrun sets it: start fixclf with "
                             "torchrun or --nproc, or unset WORLD_SIZE to run as one process")
        store = _rendezvous(world, os.environ["MASTER_ADDR"], port)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store, rank=world.rank,
                                world_size=world.size, timeout=TIMEOUT)
    return world


def _rendezvous(world: World, address: str, port: int) -> dist.Store:
    """The job's key-value store, once all ``world.size`` processes have joined it.

    torch's own ``env://`` rendezvous waits inside C++ for up to :data:`TIMEOUT`, where neither
    Ctrl-C nor SIGTERM reaches Python: a process whose peers never start hung for 30 minutes, deaf
    to ``kill``. Here every wait is a Python loop of short steps (signals are handled between
    them) bounded by :data:`RENDEZVOUS_S`: rank 0 (or torchrun's agent, ``TORCHELASTIC_USE_AGENT_STORE``)
    hosts the store, the others wait until it listens, then each process adds itself to a counter
    and waits until the counter holds everyone."""
    deadline = time.monotonic() + RENDEZVOUS_S
    hosts_store = world.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if not hosts_store:
        _wait_until_listening(address, port, deadline, world.size)
    try:
        store = dist.TCPStore(address, port, world.size, is_master=hosts_store, timeout=TIMEOUT,
                              wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise DistributedError(f"could not {'open' if hosts_store else 'reach'} the job's store at {address}:{port} "
                               f"({(str(exc).splitlines() or [''])[0][:200]}); is MASTER_PORT free and the same for "
                               "every process?") from exc
    job = dist.PrefixStore(f"fixclf/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    joined = job.add("joined", 1)
    while joined < world.size:
        _give_up_after(deadline, f"{joined} of {world.size} processes")
        time.sleep(POLL_S)
        joined = job.add("joined", 0)
    return store


def _wait_until_listening(address: str, port: int, deadline: float, size: int) -> None:
    """Return once something accepts connections at ``address:port`` (rank 0's store)."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return
        except socket.gaierror as exc:
            raise UsageError(f"MASTER_ADDR={address!r} is not a host this machine can find ({exc.strerror}); torchrun "
                             "sets it: start fixclf with torchrun or --nproc, or unset WORLD_SIZE") from None
        except OSError:
            _give_up_after(deadline, f"rank 0's store at {address}:{port} did not answer, so 1 of {size} processes")
            time.sleep(POLL_S)


def _give_up_after(deadline: float, joined: str) -> None:
    if time.monotonic() > deadline:
        raise DistributedError(f"{joined} started within {RENDEZVOUS_S:.0f} s; a job of WORLD_SIZE processes needs "
                               "them all started together: use torchrun or --nproc, or unset WORLD_SIZE to run as "
                               "one process")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


WORKER = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
          "from cli.entry import main; main()")
"""What each process runs: fixclf's entry point, found where fixclf is installed. Not ``-m cli.entry``:
that puts the current directory first, so a user's ``cli.py`` or ``compressor.py`` there would be run
instead (the user's ``--arch`` / ``--data`` modules are found there later, as in one process)."""
LAUNCHED = "FIXCLF_LAUNCHED"
"""Set in the processes :func:`launch` starts, to the launcher's process id: on Ctrl-C the launcher alone
says so, in one line; and a process whose launcher is gone (killed with SIGKILL, which it cannot pass
on) stops as on SIGTERM (cli/entry.py) rather than write outputs nobody waits for."""


def launch(arguments: list[str], processes: int) -> int:
    """Run ``fixclf arguments`` as ``processes`` processes on this machine, joined as
    ``torchrun --standalone`` joins them (its environment variables); returns the job's exit code.

    The code is the first failing process's (they agree on it: see :meth:`World.sync`), so it is
    one of fixclf's documented codes, unlike torchrun's own 1. A process that dies without
    reporting ends the others after :data:`GRACE_SECONDS`; Ctrl-C is passed to every process."""
    base = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), LAUNCHED: str(os.getpid())}
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    children = [subprocess.Popen([sys.executable, "-c", WORKER, *arguments],
                                 env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                for rank in range(processes)]
    try:
        return _wait(children)
    except KeyboardInterrupt:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            child.wait()
        kept = ("; a fine-tune state kept beside the output continues the run: rerun with --resume"
                if "--resume" in arguments else "")
        raise Interrupted(f"interrupted; every process stopped and nothing was written{kept}") from None


def _wait(children: list[subprocess.Popen]) -> int:
    failed_at = None
    while any(child.poll() is None for child in children):
        codes = [child.returncode for child in children if child.returncode is not None]
        if failed_at is None and any(codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            for child in children:
                if child.poll() is None:
                    child.terminate()
        time.sleep(0.05)
    codes = [child.returncode for child in children]
    if Interrupted.exit_code in codes:  # one process was interrupted (a signal sent to it alone); the others then
        return Interrupted.exit_code    # lost contact with it, which is not the cause
    return next((c if c > 0 else 1 for c in codes if c != 0), 0)
