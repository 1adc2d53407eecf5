"""Fine-tuning at scale: torchrun / DDP, a failing process, Ctrl-C under torchrun, streamed data in
bounded memory, resume, CUDA (skipped without a GPU)."""
from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import compressor
from compressor import CompressOptions, SourceOptions
from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.distributed import DistributedError
from compressor.errors import Interrupted, OutputError, PlanError, UsageError
from compressor.finetune import RESUME_FORMAT, ResumeFile, distill, saved_latency_verdict
from compressor.options import FinetuneOptions, PlanOptions
from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters
from cli_zygote import replies, run_many, start_many
from conftest import ROOT, SAMPLES

TESTS = Path(__file__).resolve().parent
MLP = str(SAMPLES / "mlp.pt")
# PYTHONFAULTHANDLER: a process that aborts in C++ (SIGABRT) also prints its Python stack, so a rare
# failure of these tests shows where it happened
ENV = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "FIXCLF_PROGRESS": "0"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixclf_processes(args: list[str], cwd: Path, envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """One ``fixclf args`` process per environment, all at once (forked from one that imported fixclf:
    tests/cli_zygote.py), with their exit codes and outputs (kept outside ``cwd``)."""
    logs = cwd.parent / f"{cwd.name}-logs"
    logs.mkdir()
    requests = {str(i): {"args": args, "cwd": str(cwd), "out": str(logs / f"{i}.out"), "err": str(logs / f"{i}.err"),
                         "env": {"FIXCLF_PROGRESS": "0", **env}} for i, env in enumerate(envs)}
    codes = run_many(requests)
    return [subprocess.CompletedProcess(args, codes[i], Path(r["out"]).read_text(), Path(r["err"]).read_text())
            for i, r in requests.items()]


def _launch(args: list[str], cwd: Path, world: int = 2) -> list[subprocess.CompletedProcess]:
    """``world`` processes of ``fixclf args`` joined as torchrun joins them (its environment variables),
    so that each one's exit code and output can be seen."""
    port = str(_free_port())
    return _fixclf_processes(args, cwd, [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in range(world)])


def test_torchrun_two_processes_end_where_one_process_ends(tmp_path):
    """With --mixup too: each process draws its rows' partners from the global batch, as one process does."""
    (tmp_path / "one").mkdir()
    alone = compressor.compress(CompressOptions(SourceOptions(MLP), finetune=FinetuneOptions(epochs=2, mixup=True),
                                                output=tmp_path / "one" / "mlp.fixclf.pt"))
    two = tmp_path / "two"
    two.mkdir()
    result = subprocess.run(TORCHRUN + ["-m", "cli.entry", "compress", MLP, "--epochs", "2", "--mixup", "-o",
                                        str(two / "mlp.fixclf.pt"), "--json"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # rank 0 alone prints: one JSON object
    assert report["finetune"]["world_size"] == 2 and report["finetune"]["steps"] == alone.finetune.steps
    assert abs(report["accuracy"]["after"] - alone.accuracy.after) <= 0.005
    assert sorted(p.name for p in two.iterdir()) == ["mlp.fixclf.onnx", "mlp.fixclf.pt"]
    assert compressor.load_report(two / "mlp.fixclf.pt").finetune.world_size == 2


def test_stored_integer_rows_another_process_holds_mix_as_this_process_reads_its_own(tmp_path):
    """Under --mixup a row's partner may be one of another process's rows, read from the store: uint8
    rows are then converted to float32 as this process's own rows are, not written into them as stored."""
    x = np.random.default_rng(0).integers(0, 256, (600, 64)).astype(np.uint8)
    np.savez(tmp_path / "u8.npz", x=x, y=(x[:, 0] % 10).astype(np.int64))
    results = _launch(["compress", MLP, "--data", "u8.npz", "--mixup", "--epochs", "1", "--latency-batch", "8", "--json"],
                      tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-800:] for r in results]
    assert json.loads(results[0].stdout)["finetune"]["world_size"] == 2


def test_parameters_the_loss_does_not_reach_train_under_torchrun(tmp_path):
    """An auxiliary head used only in training mode (GoogLeNet style) gets no gradient: DDP is told to
    expect that (it otherwise fails the second step, waiting for those gradients)."""
    import architectures

    torch.manual_seed(0)
    model = architectures.aux_in_training()
    torch.save(model.state_dict(), tmp_path / "aux.pt")
    x = torch.randn(300, 64)
    np.savez(tmp_path / "aux.npz", x=x.numpy(), y=model.eval()(x).argmax(1).numpy())
    results = _launch(["compress", "aux.pt", "--arch", "architectures:aux_in_training", "--data", "aux.npz", "--epochs",
                       "2", "--latency-batch", "8", "--json"], tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-800:] for r in results]
    report = json.loads(results[0].stdout)
    assert report["finetune"]["world_size"] == 2 and any("auxiliary" in w for w in report["warnings"])


def test_parameters_the_loss_misses_are_found_and_nothing_is_disturbed():
    """DDP's search for unused parameters is asked for only where needed (it costs a graph walk a step):
    not for a plain model, yes for an auxiliary head; the RNG and the BatchNorm statistics are as before."""
    import architectures
    from compressor.finetune import _loss_misses_parameters

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 3))
    options = FinetuneOptions(update_norm_stats=True)
    x = torch.randn(4, 8)
    statistics, rng = copy.deepcopy(plain[1].state_dict()), torch.get_rng_state()
    assert _loss_misses_parameters(plain, x, options, "cpu") is False
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, plain[1].state_dict()[k]) for k, v in statistics.items())
    assert _loss_misses_parameters(architectures.aux_in_training(), torch.randn(4, 64), options, "cpu") is True


def test_a_failing_process_stops_every_process_with_one_error_line(tmp_path):
    results = _launch(["compress", MLP, "--data", "data_source:bad_on_rank_one", "--epochs", "2", "-o",
                       str(tmp_path / "m.fixclf.pt")], tmp_path)
    assert [r.returncode for r in results] == [4, 4], [r.stderr[-800:] for r in results]
    lines = [line for r in results for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1:") and "corrupt record 700" in lines[0], lines
    assert not any("Traceback" in r.stderr for r in results)
    assert list(tmp_path.iterdir()) == []


def _exits_on_rank_one(directory: Path) -> list[str]:
    import architectures

    torch.save(architectures.ExitsOnRankOne().state_dict(), directory / "exits.pt")
    return ["compress", str(directory / "exits.pt"), "--arch", "architectures:ExitsOnRankOne", "--data", str(SAMPLES / "digits.npz")]


@pytest.mark.parametrize("failure, code, said", [
    (lambda d: ["compress", MLP, "--data", "data_source:bad_later_on_rank_one"], 4, "corrupt record"),
    (_exits_on_rank_one, 3, "called sys.exit(0)"),
], ids=["a batch that fails to read", "a forward that calls sys.exit"])
def test_a_batch_failing_on_one_process_in_the_fine_tune_stops_every_process_with_its_code(tmp_path, failure, code,
                                                                                           said):
    """A failure agreed at the fine-tune step's sync is not reported again at the stage's end (the
    process that failed waited there alone for the others: exit 1 'lost contact'). The model's own
    sys.exit on one process is such a failure too (before: that process ended, the other lost contact)."""
    (tmp_path / "job").mkdir()
    results = _launch(failure(tmp_path) + ["--epochs", "3", "-o", str(tmp_path / "job" / "m.fixclf.pt")], tmp_path / "job")
    assert [r.returncode for r in results] == [code, code], [r.stderr[-800:] for r in results]
    lines = [line for r in results for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1:") and said in lines[0], lines
    assert list((tmp_path / "job").iterdir()) == []


def test_nproc_launches_the_processes_and_exits_with_the_failing_code(tmp_path):
    """The processes run fixclf's own entry point, whatever the current directory holds (a user's cli.py or
    compressor.py there is neither run nor in the way)."""
    decoys = {"cli.py": "raise SystemExit('the user cli.py ran')\n", "compressor.py": "raise SystemExit('the user compressor.py ran')\n"}
    for name, text in decoys.items():
        (tmp_path / name).write_text(text)
    result, = _fixclf_processes(["compress", MLP, "--nproc", "2", "--data", "data_source:bad_on_rank_one", "--epochs",
                                 "2", "-o", str(tmp_path / "m.fixclf.pt")], tmp_path, [{"PYTHONPATH": ENV["PYTHONPATH"]}])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 4 and len(lines) == 1 and lines[0].startswith("error: rank 1:"), result.stderr[-1500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(decoys)


def test_ctrl_c_under_torchrun_stops_every_process_and_writes_nothing(tmp_path):
    proc = subprocess.Popen(TORCHRUN + ["-m", "cli.entry", "compress", MLP, "--epochs", "400", "-o",
                                        str(tmp_path / "m.fixclf.pt")],
                            cwd=tmp_path, env={**ENV, "FIXCLF_PROGRESS": "1"}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stderr:
        if "Fine-tuning" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole process group
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0
    assert "error: interrupted" in rest, rest[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_under_nproc_is_said_once_and_writes_nothing(tmp_path):
    """Ctrl-C reaches the launcher and both processes (one process group): the launcher alone says so, in
    one line, and names the resume state --resume keeps."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.entry", "compress", MLP, "--nproc", "2", "--epochs", "400",
                             "--resume", "-o", str(tmp_path / "m.fixclf.pt")],
                            cwd=tmp_path, env={**ENV, "FIXCLF_PROGRESS": "1"}, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stderr:
        if "Fine-tuning" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    errors = [line for line in proc.communicate(timeout=120)[1].splitlines() if line.startswith("error:")]
    assert proc.returncode == 130 and len(errors) == 1, errors
    assert "every process stopped and nothing was written" in errors[0] and "--resume" in errors[0]
    assert {p.name for p in tmp_path.iterdir()} <= {"m.fixclf.resume.pt"}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_processes_of_a_launcher_killed_outright_stop_and_write_nothing(tmp_path):
    """SIGKILL cannot be passed on: the launcher's processes notice it gone (they are re-parented) and stop
    as on SIGTERM, rather than finish a job nobody waits for and write its outputs later."""
    log = tmp_path.parent / f"{tmp_path.name}.err"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cli.entry", "compress", MLP, "--nproc", "2", "--epochs", "400",
                                 "-o", str(tmp_path / "m.fixclf.pt")], cwd=tmp_path, env={**ENV, "FIXCLF_PROGRESS": "1"},
                                stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Fine-tuning" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), log.read_text()
    assert list(tmp_path.iterdir()) == []


STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc's adaptive threshold would add fragmentation noise


def _peak_rss_mb(rows: list[int], cwd: Path) -> list[float]:
    """Peak resident memory (MB) of one compress of the wide model on a stream of each of ``rows`` rows,
    all at once, each in its own process forked from the same one (tests/cli_zygote.py)."""
    torch.save(__import__("data_source").wide_mlp().state_dict(), cwd / "wide.pt")
    requests = {str(n): {"args": ["compress", "wide.pt", "--arch", "data_source:wide_mlp", "--data", "data_source:wide_stream",
                                  "--hidden", "keep", "--epochs", "1", "--batch-size", "256", "--latency-batch", "8",
                                  "-o", f"w{n}.fixclf.pt", "--json"],
                         "cwd": str(cwd), "out": str(cwd / f"{n}.json"), "err": str(cwd / f"{n}.err"),
                         "env": {"FIXCLF_TEST_ROWS": str(n), **STEADY_MALLOC}} for n in rows}
    start_many(requests)
    got = replies(requests)
    for n in rows:
        assert got[str(n)]["code"] == 0, (cwd / f"{n}.err").read_text()[-2000:]
        assert json.loads((cwd / f"{n}.json").read_text())["data"]["train"] == n - n // 5
    return [got[str(n)]["peak_rss_mb"] for n in rows]


def test_a_stream_larger_than_the_memory_bound_streams_through(tmp_path):
    """Three times the rows (98 MB -> 295 MB of float32) must not grow the peak memory: what is held
    (calibration, validation and latency rows, one batch) is bounded, the rest streams through."""
    small, big = _peak_rss_mb([3_000, 9_000], tmp_path)
    bound_mb = 40
    assert big - small < bound_mb, f"peak RSS grew {big - small:.0f} MB for 197 MB more data"


def _tune(resume: ResumeFile | None, stop_at: int | None = None, max_time: float | None = None):
    """The MLP sample's student after a 3-epoch distillation (interrupted at step ``stop_at``)."""
    loaded = load_model(MLP)
    data = load_data(loaded.data)
    plan = make_plan(loaded.model, PlanOptions())
    torch.manual_seed(0)
    student = apply_plan(copy.deepcopy(loaded.model), plan)
    initialise_from_dense(loaded.model, student, plan, data.head("train", 512)[0])

    def on_step(epoch, step, loss):
        on_step.seen += 1
        if on_step.seen == stop_at:
            raise KeyboardInterrupt
    on_step.seen = 0
    result = distill(student, loaded.model, data, FinetuneOptions(epochs=3, max_time=max_time), replaced_parameters(student, plan),
                     resume=resume, on_step=on_step)
    return student.state_dict(), result


def test_resume_ends_in_the_state_of_an_uninterrupted_run(tmp_path):
    state = ResumeFile(tmp_path / "m.resume.pt", {"run": 1}, save_every=7, kept_for_latency={"2": "slower"})
    uninterrupted, whole = _tune(None)
    with pytest.raises(Interrupted, match="rerun with --resume"):
        _tune(state, stop_at=40)  # in epoch 2 (23 steps each), 3 steps after the last save
    assert saved_latency_verdict(state.path) == {"2": "slower"}  # what --objective latency kept, for the rerun
    resumed, rest = _tune(state)
    assert rest.resumed_from == 37 and rest.steps == whole.steps  # saves: 23 (epoch 1), 30, 37
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    with pytest.raises(UsageError, match="other settings \\(run\\)"):
        _tune(ResumeFile(state.path, {"run": 2}))


def test_resume_state_lives_beside_the_output_until_it_is_written(tmp_path):
    """... and is taken up only by the same run: the same model bytes (not just its name and size), the
    same data file (a rewritten one has a new time), the same options that shape the result (lr,
    temperature); max_time and save_every may change."""
    model, original = tmp_path / "m.pt", torch.load(MLP, weights_only=True)
    torch.save(original, model)
    size = model.stat().st_size
    data = tmp_path / "digits.npz"
    data.write_bytes((SAMPLES / "digits.npz").read_bytes())
    options = CompressOptions(SourceOptions(model, data=data),
                              finetune=FinetuneOptions(epochs=1, resume=True), output=tmp_path / "c.fixclf.pt")

    class StopAt(compressor.Events):
        def step(self, epoch, step, loss):
            if step == 10:
                raise KeyboardInterrupt
    with pytest.raises(Interrupted):
        compressor.compress(options, StopAt())
    assert (tmp_path / "c.fixclf.resume.pt").is_file() is False  # no epoch ended, no --save-every: nothing to keep
    options.finetune.save_every = 5
    with pytest.raises(Interrupted, match="rerun with --resume"):
        compressor.compress(options, StopAt())
    options.finetune.lr = 0.001
    with pytest.raises(UsageError, match="other settings \\(finetune.lr\\)"):
        compressor.compress(options)
    options.finetune.lr, options.finetune.temperature = FinetuneOptions().lr, 8.0
    with pytest.raises(UsageError, match="other settings \\(finetune.temperature\\)"):
        compressor.compress(options)
    options.finetune.temperature = FinetuneOptions().temperature
    retrained = copy.deepcopy(original)
    retrained["state_dict"]["0.bias"] += 1  # another model of the same architecture: the same file size
    torch.save(retrained, model)
    assert model.stat().st_size == size
    with pytest.raises(UsageError, match="written by another run: the checkpoint's bytes changed since"):
        compressor.compress(options)
    torch.save(original, model)
    stamp = data.stat().st_mtime_ns
    os.utime(data, ns=(stamp + 10**9, stamp + 10**9))  # the data file rewritten (same bytes, here)
    with pytest.raises(UsageError, match="written by another run: the data files changed since"):
        compressor.compress(options)
    os.utime(data, ns=(stamp, stamp))
    options.finetune.max_time, options.finetune.save_every = 600.0, None

    class StopWhileTiming(compressor.Events):
        def stage(self, text):
            if text.startswith("Measuring ONNX Runtime"):
                raise KeyboardInterrupt
    with pytest.raises(Interrupted, match="nothing was written; the fine-tune state is kept in .*rerun with --resume"):
        compressor.compress(options, StopWhileTiming())  # Ctrl-C after the fine-tune, as the library sees it
    compressor.compress(options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.fixclf.onnx", "c.fixclf.pt", "digits.npz", "m.pt"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: --device cuda is checked "
                    "on the GPU machine (docs/benchmarks.md)")
def test_cuda_fine_tune_with_mixed_precision(tmp_path):
    report = compressor.compress(CompressOptions(SourceOptions(MLP), finetune=FinetuneOptions(epochs=3, device="cuda"),
                                                 output=tmp_path / "g.fixclf.pt"))
    assert report.options["device"] == "cuda" and report.accuracy.after > 0.9


@pytest.mark.parametrize("variable, value", [("WORLD_SIZE", "abc"), ("RANK", "")])
def test_a_malformed_torchrun_variable_is_a_usage_error(monkeypatch, variable, value):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(UsageError, match=f"{variable}=.*not a whole number"):
        compressor.compress(CompressOptions(SourceOptions(MLP)))


def test_a_resumed_objective_latency_run_keeps_the_layers_its_state_kept(workdir):
    """--objective latency with --resume takes the kept-dense layers from the resume state rather than
    timing them again (near a tie a new timing may decide otherwise and train another plan). Here every
    replacement of the MLP sample times slower (compress refuses: nothing left to replace), but the state
    says nothing was kept: the plan replaces every layer and the run reaches the state's own check."""
    options = CompressOptions(SourceOptions(MLP), plan=PlanOptions(objective="latency"),
                              finetune=FinetuneOptions(resume=True), output="m.fixclf.pt")
    with pytest.raises(PlanError, match="no layer would be replaced"):
        compressor.compress(options)
    torch.save({"format": RESUME_FORMAT, "fingerprint": {"run": "another"}, "kept_for_latency": {}}, "m.fixclf.resume.pt")
    with pytest.raises(UsageError, match="written by another run"):
        compressor.compress(options)


def test_a_damaged_resume_state_is_refused_by_name(tmp_path):
    """A resume state is read like any file fixclf did not just write: counts must lie within the run,
    the fixed permutations must be the plan's, and shared references or a pickled structure too large to
    read quickly are refused, each as a usage error."""
    state = ResumeFile(tmp_path / "m.resume.pt", {"run": 1})
    with pytest.raises(Interrupted):
        _tune(state, stop_at=30)  # after the save at the end of epoch 1
    saved = torch.load(state.path, weights_only=True)
    permutation = next(k for k in saved["student"] if k.endswith("permutations"))
    laughs = [0] * 1000
    for _ in range(3):
        laughs = [laughs] * 1000
    damages = {"epoch": (lambda s: s.update(epoch=-10**18), "epoch .* is not a count"),
               "seconds": (lambda s: s.update(seconds=float("nan")), "seconds are not a finite time"),
               "permutation": (lambda s: s["student"][permutation].__setitem__((0, 0), 10**6), "changes .*permutations"),
               "shared references": (lambda s: s.update(history=laughs), "more than 1,000,000 values"),
               "a huge pickle": (lambda s: s.update(history="x" * (33 << 20)), "pickled structure of .* not a fixclf resume")}
    for damage, match in damages.values():
        damaged = copy.deepcopy(saved)
        damage(damaged)
        torch.save(damaged, state.path)
        with pytest.raises(UsageError, match=match):
            _tune(state)
    state.path.write_bytes(pickle.dumps(b"x" * (33 << 20)))  # not a zip: the whole file would be one pickle
    with pytest.raises(UsageError, match="not a zip archive.* not a fixclf resume state"):
        _tune(state)
    finished = copy.deepcopy(saved)
    finished.update(epoch=4, step_in_epoch=0, steps=3 * 23)  # saved after the last of 3 epochs: the export is left
    torch.save(finished, state.path)
    assert _tune(state)[1].resumed_from == 3 * 23
    spent = dict(saved, seconds=1000.0)  # --max-time is the whole run's: earlier invocations' seconds count
    torch.save(spent, state.path)
    result = _tune(state, max_time=500.0)[1]
    assert result.stopped_by == "max_time" and result.steps == saved["steps"] + 1
    torch.save({"format": "fixclf.model/1"}, state.path)  # another file where the resume state goes: an output refused
    with pytest.raises(OutputError, match="is not a fixclf resume state, so --resume does not replace it"):
        _tune(state)


def test_a_resume_fingerprint_stamps_a_shard_directorys_files_each(tmp_path):
    """A shard rewritten in place leaves its directory's size and time as they were: each file is stamped."""
    from compressor.api import _file_stamps

    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", np.zeros((4, 64), np.float32))
    before = _file_stamps([shards])
    assert list(before) == [str((shards / "a.npy").resolve())]
    stamp = (shards / "a.npy").stat().st_mtime_ns
    np.save(shards / "a.npy", np.ones((4, 64), np.float32))
    os.utime(shards / "a.npy", ns=(stamp + 10**9, stamp + 10**9))
    assert _file_stamps([shards]) != before


@pytest.mark.parametrize("environment, refusal", [
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=5 of WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "-1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "ranks run from 0 to 1"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT not"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
])
def test_an_environment_no_process_group_can_be_joined_with_is_refused_before_joining(monkeypatch, environment, refusal):
    """A rank outside the world would wait for its rendezvous for the whole timeout; no address fails in
    torch with a ValueError: both are usage errors naming the variables, before any joining."""
    from compressor.distributed import world_from_environment
    from compressor.errors import UsageError

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=refusal) as refused:
        world_from_environment("cpu")
    assert refused.value.heard_only_here  # no other process heard of it: this one prints it, whatever its rank


@pytest.mark.parametrize("rank, host, failure", [
    ("0", "127.0.0.1", (DistributedError, "1 of 2 processes started within 1 s")),
    ("1", "127.0.0.1", (DistributedError, "rank 0's store at 127.0.0.1:.* did not answer")),
    ("1", "no-such-host.invalid", (UsageError, "MASTER_ADDR='no-such-host.invalid' is not a host")),
])
def test_a_process_whose_peers_never_start_gives_up_by_name(monkeypatch, rank, host, failure):
    """The rendezvous is bounded by RENDEZVOUS_S (torch's own waited 30 minutes in C++), and names what
    is missing; an address that names no host fails at once."""
    from compressor import distributed

    monkeypatch.setattr(distributed, "RENDEZVOUS_S", 1.0)
    for name, value in {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": host, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    error, message = failure
    with pytest.raises(error, match=message):
        distributed.world_from_environment("cpu")
    assert not torch.distributed.is_initialized()


def test_a_process_other_than_rank_0_prints_an_error_no_other_process_heard_of(tmp_path):
    """Only rank 0 prints an error every process agreed on; an error of this process's own environment
    (here a rank outside the job), which no other process will report, it prints itself: one line."""
    done = subprocess.run([sys.executable, "-m", "cli.entry", "compress", MLP, "-o", str(tmp_path / "m.fixclf.pt")],
                          cwd=tmp_path, env={**ENV, "WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": str(_free_port())}, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: rank 5: the environment says RANK=5 of WORLD_SIZE=2") and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_lost_its_peers_reports_its_own_error_or_the_loss_itself(monkeypatch):
    """A sync that fails (a peer died) is met by this process alone: it prints it, whatever its rank,
    and an error it was reporting is the one it prints, not the lost contact."""
    from compressor import distributed
    from compressor.errors import DataError

    def lost(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(distributed.dist, "all_gather_object", lost)
    world = distributed.World(rank=1, size=2)
    with pytest.raises(DataError, match="^rank 1: bad row 7$") as own:
        world.sync(error=DataError("bad row 7"))
    with pytest.raises(DistributedError, match="^rank 1: lost contact with the other processes") as loss:
        world.sync([1.0])
    assert own.value.heard_only_here and loss.value.heard_only_here


def test_sigterm_stops_a_process_waiting_for_its_peers(tmp_path):
    """Rank 0 of two, alone: it waits for rank 1 in a loop that Python's signal handlers interrupt, so
    `kill` ends it at once (exit 130, one line, nothing written); torch's rendezvous held the signal."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.entry", "compress", MLP, "-o", str(tmp_path / "m.fixclf.pt")],
                            cwd=tmp_path, env={**ENV, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                               "MASTER_PORT": str(port)}, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until rank 0's store listens: the process is in the rendezvous
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=20)[1]
    assert proc.returncode == 130 and stderr.strip() == "error: interrupted; nothing was written", stderr
    assert list(tmp_path.iterdir()) == []


def test_the_launcher_exits_130_when_one_process_alone_was_interrupted():
    """A signal sent to one of --nproc's processes alone: it exits 130 and the others lose contact with it
    (exit 1); the job's code is the interrupt's, not the lost contact's."""
    from compressor.distributed import _wait

    lost = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(1)"])
    interrupted = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(130)"])
    assert _wait([lost, interrupted]) == 130


def test_a_resume_state_whose_optimiser_or_schedule_was_tampered_with_is_refused_before_it_is_loaded():
    """torch's load_state_dict copies such dicts into place unchecked, which failed later (T_max 0:
    ZeroDivisionError; moments of another shape: RuntimeError) as "unexpected" errors."""
    from compressor.finetune import _check_optimiser_state, _check_schedule_state

    weight = torch.nn.Parameter(torch.zeros(3, 2))
    optimiser = torch.optim.Adam([weight], lr=0.02)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 10)
    weight.grad = torch.ones_like(weight)
    optimiser.step()
    scheduler.step()
    moved, schedule = optimiser.state_dict(), scheduler.state_dict()
    _check_optimiser_state(copy.deepcopy(moved), optimiser)  # a real state after a step: accepted
    _check_schedule_state(copy.deepcopy(schedule), scheduler)
    for tampered in ({"T_max": 0}, {"optimizer": {}}, {"base_lrs": ["x"]}, {"last_epoch": -5}, {"_last_lr": [float("nan")]}):
        with pytest.raises(ValueError):
            _check_schedule_state({**schedule, **tampered}, scheduler)
    wrong_shape = copy.deepcopy(moved)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(7)
    string_lr, betas = copy.deepcopy(moved), copy.deepcopy(moved)
    string_lr["param_groups"][0]["lr"] = "abc"
    betas["param_groups"][0]["betas"] = (2.0, -1.0)
    for tampered in (wrong_shape, string_lr, betas, {"state": {}, "param_groups": []}, {**moved, "state": {5: {}}}):
        with pytest.raises(ValueError):
            _check_optimiser_state(tampered, optimiser)
