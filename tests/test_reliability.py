"""Reliability: interrupted runs resume exactly, checkpoints never corrupt, bad input gets one clear line.

The faults are real ones. Training subprocesses are killed with SIGKILL or
interrupted with SIGINT in the middle of an epoch and then resumed; a writer is
SIGKILLed while a checkpoint is half written; runs diverge; damaged and
ill-typed checkpoints and random command lines are fed to the loaders and the
parser. What must hold:

* a resumed run ends with parameters bitwise equal to an uninterrupted run with
  the same seed, and ``metrics.jsonl`` holds every epoch exactly once;
* ``checkpoint.npz`` is always one complete version, whatever moment a process
  dies at; leftover ``checkpoint.npz.*.tmp`` files are never read, and the next
  run in the folder deletes those whose writer is dead;
* no checkpoint with non-finite parameters is ever written;
* loading any bytes gives a checkpoint or a :class:`CheckpointError`, and the
  command line answers bad input with one line and exit status 2.
"""

import argparse
import copy
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from scratchvae import train as T
from scratchvae.files import FolderLock, atomic_write, remove_stale_temporaries
from scratchvae.checkpoint import VERSION, CheckpointError, load_checkpoint, restore_model, save_checkpoint
from scratchvae.cli import UsageError, build_parser, cmd_train, main
from scratchvae.model import VAE
from scratchvae.optim import Adam

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "mnist"

# One small run, used by every subprocess test: 512 images in batches of 8 is 64 steps an epoch.
N_TRAIN, BATCH, EPOCHS = 512, 8, 2
N_STEPS = N_TRAIN // BATCH
FLAGS = [
    "--data-dir", DATA, "--train-size", N_TRAIN, "--test-size", 128, "--hidden", 32, "--latent", 4,
    "--batch-size", BATCH, "--epochs", EPOCHS, "--binarize", "dynamic", "--seed", 3, "--progress", "off",
]  # fmt: skip
FLAGS = [str(a) for a in FLAGS]


def small_config(out, **kw):
    """The :class:`TrainConfig` that ``train *FLAGS --out out`` builds."""
    base = dict(data_dir=str(DATA), train_size=N_TRAIN, test_size=128, hidden=(32,), latent_dim=4, batch_size=BATCH,
                epochs=EPOCHS, binarize="dynamic", seed=3, out=str(out))  # fmt: skip
    base.update(kw)
    return T.TrainConfig(**base)


def quiet(*_):
    pass


def cli_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def start_train(out, *extra):
    """``python -m scratchvae train *FLAGS --out out *extra`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "scratchvae", "train", *FLAGS, "--out", str(out), *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent, env=cli_env(),
    )  # fmt: skip


def run_train(out, *extra):
    proc = start_train(out, *extra)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def wait_for(condition, proc, timeout=120):
    """Poll ``condition()`` every 10 ms until it holds; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"the run ended (status {proc.returncode}) before the moment to stop it:\n{stdout}\n{stderr}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("timed out waiting for the run to reach the moment to stop it")


def checkpoint_meta(out):
    """The meta of ``out/checkpoint.npz``, or None while there is none."""
    path = out / T.CHECKPOINT
    return load_checkpoint(path).meta if path.exists() else None


def metrics_rows(out):
    path = out / T.METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_one_line(stderr, start="scratchvae: error:"):
    """Exactly one line on stderr, starting with ``start``, no traceback, no warnings; returns it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(start), lines[0]
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    return lines[0]


def assert_same_as_reference(out, reference):
    """Final parameters bitwise equal to the uninterrupted run; every epoch in metrics.jsonl exactly once."""
    final = load_checkpoint(out / T.CHECKPOINT)
    assert (final.meta["epoch"], final.meta["step"]) == (EPOCHS + 1, 0)
    assert np.array_equal(final.params, reference["params"])
    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for row, ref in zip(rows, reference["history"]):
        for key in ("train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl"):
            assert row[key] == ref[key], (row["epoch"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process and without mid-epoch checkpoints."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run = T.Run(small_config(out), log=quiet)
    history = run.run()
    return {"params": run.model.params.copy(), "history": history, "checkpoint": out / T.CHECKPOINT}


@pytest.fixture(scope="module")
def midway(tmp_path_factory):
    """A run stopped after 3 steps of epoch 1 (as SIGINT stops it): its Run and its checkpoint's bytes."""
    out = tmp_path_factory.mktemp("midway") / "run"
    run = T.Run(small_config(out, epochs=1), log=quiet)
    run.out.mkdir(parents=True)
    steps = iter(range(1, 100))
    with pytest.raises(T._Interrupted):
        run.train_epoch(lambda: next(steps) == 3)
    path = out / T.CHECKPOINT
    ckpt = load_checkpoint(path)
    assert (ckpt.meta["epoch"], ckpt.meta["step"]) == (1, 3) and "perm" in ckpt.arrays
    return run, path.read_bytes()


# ------------------------------------------------------------------------------------------
# 1. SIGKILL in the middle of an epoch, then --resume.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_train(out, "--checkpoint-every", 1)

    def inside_second_epoch():  # epoch 1 is in metrics.jsonl, and a few steps of epoch 2 are checkpointed
        meta = metrics_rows(out) and checkpoint_meta(out)
        return bool(meta) and meta["epoch"] == 2 and meta["step"] >= 3

    wait_for(inside_second_epoch, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = checkpoint_meta(out)
    assert killed["epoch"] == 2 and 3 <= killed["step"] < N_STEPS, killed["step"]
    assert [r["epoch"] for r in metrics_rows(out)] == [1]

    # Some earlier crash also left half-written temporary files beside the checkpoint: one named
    # as atomic_write names them, and one of another pattern.
    orphan = f"checkpoint.npz.{dead_pid()}.0123abcd.tmp"
    for name in (orphan, "checkpoint.npz.k7q2x9.tmp"):
        (out / name).write_bytes(reference["checkpoint"].read_bytes()[:1000])

    status, stdout, stderr = run_train(out, "--checkpoint-every", 1, "--resume")
    assert status == 0, stderr
    assert f"resuming {out} at epoch 2, step {killed['step']}" in stdout
    assert_same_as_reference(out, reference)
    tmp_left = sorted(p.name for p in out.glob("*.tmp"))
    said = f"removed what a killed write left behind in {out}: "  # the kill may have left one more, of its own
    (line,) = [line for line in stdout.splitlines() if line.startswith(said)]
    assert orphan in line[len(said) :].split(", ")
    assert tmp_left == ["checkpoint.npz.k7q2x9.tmp"]  # not atomic_write's: left alone


def dead_pid():
    """The process id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_our_temporary_files_from_before_the_run_are_removed(tmp_path):
    start = time.time()
    files = {  # name: (seconds before the run started, removed?)
        "checkpoint.npz.4242.0123abcd.tmp": (60, True),
        "samples.png.17.89abcdef.tmp": (1, True),
        f"checkpoint.npz.{os.getpid()}.0123abcd.tmp": (3600, True),  # any pid: only the time counts
        "checkpoint.npz.4242.89abcdef.tmp": (-1, False),  # written since the run started
        "notes.txt.4242.0123abcd.tmp": (60, False),  # not a name of ours
        "checkpoint.npz.k7q2x9.tmp": (60, False),  # not atomic_write's pattern
        "checkpoint.npz.4242.0123ABCD.tmp": (60, False),
        "checkpoint.npz.4242.0123abcd.tmp.txt": (60, False),
        "checkpoint.npz.99999999999.0123abcd.tmp": (60, False),  # not a pid
        "checkpoint.npz": (60, False),
    }
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (start - age, start - age))
    (tmp_path / "checkpoint.npz.4242.00000000.tmp").mkdir()  # not a file
    os.utime(tmp_path / "checkpoint.npz.4242.00000000.tmp", (start - 60, start - 60))
    removed = remove_stale_temporaries(tmp_path, lambda name: name == "checkpoint.npz" or name.endswith(".png"), start)
    assert removed == sorted(name for name, (_, gone) in files.items() if gone)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([name for name, (_, gone) in files.items() if not gone] + ["checkpoint.npz.4242.00000000.tmp"])


def test_a_write_in_progress_is_not_removed(tmp_path):
    start, seen = time.time() - 1, []

    def write(f):  # in the middle of the write, the folder is cleaned
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        seen.append(remove_stale_temporaries(tmp_path, lambda name: True, start))
        f.write(b"complete")

    atomic_write(tmp_path / "metrics.jsonl", write)
    (writing,), removed = seen
    assert re.fullmatch(rf"metrics\.jsonl\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", writing)
    assert removed == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"complete"
    (tmp_path / writing).write_bytes(b"half")  # the same name left by a killed write: removed by the next run
    assert remove_stale_temporaries(tmp_path, lambda name: True, time.time() + 1) == [writing]


# ------------------------------------------------------------------------------------------
# 2. SIGKILL while a checkpoint is being written.
# ------------------------------------------------------------------------------------------

# Writes checkpoints of `n` float32 parameters in a loop; version c has every parameter equal
# to c and meta["counter"] == c. It continues from the version on disk, and says on stdout
# when it begins and ends each write, each line in one write(2) so that the kill cannot cut
# it in two (print() writes its words one by one when Python's stdout is unbuffered).
WRITER = """
import os, sys
from pathlib import Path
import numpy as np
from scratchvae.checkpoint import load_checkpoint, save_checkpoint

path, n = Path(sys.argv[1]), int(sys.argv[2])
counter = load_checkpoint(path).meta["counter"] + 1 if path.exists() else 0
while True:
    os.write(1, f"begin {counter}\\n".encode())
    save_checkpoint(path, np.full(n, counter, np.float32), {"model": {}, "counter": counter},
                    {"counter": np.array([counter])})
    os.write(1, f"end {counter}\\n".encode())
    counter += 1
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_one_complete_version(tmp_path):
    path = tmp_path / "checkpoint.npz"
    n = 1 << 22  # 16 MiB: each write takes tens of milliseconds
    rng = random.Random(20240605)
    on_disk = None
    try:
        for _ in range(6):
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n)], stdout=subprocess.PIPE,
                                    text=True, env=cli_env())  # fmt: skip
            first = 0 if on_disk is None else on_disk + 1
            # kill during (or just after) the write of this version; the first run completes version 0
            target = first + rng.randrange(3) + (on_disk is None)
            for line in proc.stdout:
                if line.split() == ["begin", str(target)]:
                    break
            else:
                pytest.fail(f"the writer stopped before version {target} (status {proc.wait()})")
            time.sleep(rng.uniform(0, 0.03))
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read()
            proc.wait()
            finished = [int(w) for kind, w in (line.split() for line in rest.splitlines()) if kind == "end"]
            last_finished = max(finished, default=target - 1)

            ckpt = load_checkpoint(path)  # the real file: complete, whatever moment the kill came at
            counter = ckpt.meta["counter"]
            assert counter in (last_finished, last_finished + 1)  # the newest finished one, or the one being renamed
            assert on_disk is None or counter >= on_disk
            assert np.array_equal(ckpt.params, np.full(n, counter, np.float32))
            assert np.array_equal(ckpt.arrays["counter"], [counter])
            on_disk = counter

        leftovers = sorted(tmp_path.glob("checkpoint.npz.*.tmp"))
        assert leftovers, "no kill landed inside a write, so this test proved nothing"
        assert sorted(tmp_path.glob("*.npz")) == [path]  # a temporary file never takes a checkpoint's name
        for tmp in leftovers:  # a half-written file is refused, never half read
            try:
                partial = load_checkpoint(tmp)
            except CheckpointError:
                continue
            assert np.array_equal(partial.params, np.full(n, partial.meta["counter"], np.float32))
        # the names atomic_write gave them are recognised, and the next run removes them
        assert remove_stale_temporaries(tmp_path, lambda name: True, time.time() + 1) == [p.name for p in leftovers]
        assert sorted(tmp_path.iterdir()) == [path]
        assert load_checkpoint(path).meta["counter"] == on_disk
    finally:
        for p in tmp_path.iterdir():
            p.unlink()


# ------------------------------------------------------------------------------------------
# 3. SIGINT or SIGTERM in the middle of an epoch.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_saves_prints_the_resume_command_and_resumes_exactly(signum, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_train(out, "--checkpoint-every", 16)
    wait_for(lambda: (out / T.CHECKPOINT).exists(), proc)  # step 16 is checkpointed: training is under way
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    line = assert_one_line(stderr, start=f"scratchvae: {signal.Signals(signum).name}: interrupted")
    match = re.fullmatch(
        r"scratchvae: SIG(INT|TERM): interrupted at epoch (\d+), step (\d+); checkpoint saved to (.+); "
        r"resume with: (.+)",
        line,
    )
    assert match, line
    epoch, step = int(match[2]), int(match[3])
    assert Path(match[4]) == out / T.CHECKPOINT
    assert (checkpoint_meta(out)["epoch"], checkpoint_meta(out)["step"]) == (epoch, step)
    assert (epoch, step) > (1, 16) and 0 < step <= N_STEPS  # inside an epoch, after the first checkpoint

    command = shlex.split(match[5])  # the exact command: the first one's flags, plus --resume
    assert command[:3] == ["python", "-m", "scratchvae"]
    assert command[3:] == ["train", *FLAGS, "--out", str(out), "--checkpoint-every", "16", "--resume"]
    proc = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=out.parent,
                          env=cli_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"resuming {out} at epoch {epoch}, step {step}" in proc.stdout
    assert_same_as_reference(out, reference)


# ------------------------------------------------------------------------------------------
# 4. Numerical faults: divergence never overwrites a good checkpoint with a bad one.
# ------------------------------------------------------------------------------------------

DIVERGING = {
    # the loss overflows at step 2, after step 1 was checkpointed
    "loss": dict(optimizer="adam", lr=1e6, likelihood="gaussian_learned", batch_size=64, checkpoint_every=1),
    # one update overflows the parameters at the last step of epoch 1, just before its checkpoint
    "update": dict(optimizer="sgd", lr=1e38, likelihood="bernoulli", batch_size=512, checkpoint_every=0),
    # Adam's second-moment sum overflows to inf: the parameters freeze but stay finite, the loss stays finite
    "optimiser state": dict(optimizer="adam", lr=1e5, likelihood="bernoulli", batch_size=64, checkpoint_every=1),
}


@pytest.mark.parametrize("case", sorted(DIVERGING))
def test_divergence_stops_with_epoch_and_step_and_writes_no_bad_checkpoint(case, tmp_path, monkeypatch):
    written = []
    real_save = T.save_checkpoint

    def spy(path, params, meta, arrays=None):
        finite = [np.isfinite(a).all() for a in [params, *(arrays or {}).values()] if a.dtype.kind == "f"]
        written.append((meta["epoch"], meta["step"], bool(all(finite))))
        return real_save(path, params, meta, arrays)

    monkeypatch.setattr(T, "save_checkpoint", spy)
    cfg = small_config(tmp_path / "run", binarize="none", **DIVERGING[case])
    with pytest.raises(T.TrainingDiverged, match=r"epoch 1\b.*step \d+"):
        T.train(cfg, log=quiet)
    assert all(finite for _, _, finite in written), written
    path = tmp_path / "run" / T.CHECKPOINT
    if path.exists():  # the last good one: it loads, and restore_model refuses NaN or inf
        assert np.isfinite(restore_model(load_checkpoint(path)).params).all()


@pytest.mark.parametrize("every,at_step,guard", [(0, 8, "test loss"), (5, 5, "parameters")])
def test_nan_injected_into_the_parameters_keeps_the_last_good_checkpoint(every, at_step, guard, tmp_path, monkeypatch):
    """NaN put into the parameters by update ``at_step`` of epoch 2 (a stand-in for an update that overflows).

    Caught either by the test loss at the epoch end (8 steps an epoch) or, with a
    checkpoint due right after the bad update, by the save itself: the run stops
    naming epoch and step, and the file on disk is byte for byte the last
    checkpoint written before, the one of the end of epoch 1.
    """
    written = []
    real_save = T.save_checkpoint

    def spy(path, params, meta, arrays=None):
        assert np.isfinite(params).all(), (meta["epoch"], meta["step"])
        saved = real_save(path, params, meta, arrays)
        written.append(saved.read_bytes())
        return saved

    monkeypatch.setattr(T, "save_checkpoint", spy)
    cfg = small_config(tmp_path / "run", epochs=3, batch_size=64, binarize="none", checkpoint_every=every)
    run = T.Run(cfg, log=quiet)
    step = run.engine.step  # loss, gradient and update (on every thread the run uses)

    def faulty_step(x, beta=1.0, **kw):
        out = step(x, beta, **kw)
        if (run.epoch, run.step + 1) == (2, at_step):
            run.model.params[7] = np.nan
        return out

    run.engine.step = faulty_step
    with pytest.raises(T.TrainingDiverged, match=rf"{guard} .*epoch 2, step {at_step}\b"):
        run.run()
    path = tmp_path / "run" / T.CHECKPOINT
    assert path.read_bytes() == written[-1]
    assert (load_checkpoint(path).meta["epoch"], load_checkpoint(path).meta["step"]) == (2, 0)
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run")] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DIVERGING))
def test_divergence_on_the_command_line_is_status_1_and_one_line(case, tmp_path):
    c = DIVERGING[case]
    flags = ["--optimizer", c["optimizer"], "--lr", c["lr"], "--likelihood", c["likelihood"], "--batch-size",
             c["batch_size"], "--checkpoint-every", c["checkpoint_every"], "--epochs", 2]  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "scratchvae", "train", *FLAGS, *map(str, flags), "--out", str(out)],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = assert_one_line(proc.stderr)
    assert re.search(r"training diverged: .*epoch 1\b.*step \d+", line), line
    if (out / T.CHECKPOINT).exists():
        assert np.isfinite(restore_model(load_checkpoint(out / T.CHECKPOINT)).params).all()


# ------------------------------------------------------------------------------------------
# 5. Bad input at the command line: one line, status 2, nothing half done.
# ------------------------------------------------------------------------------------------


def main_error(capsys, *argv):
    """Run ``main(argv)`` in this process: it must return 2 with one line on stderr; returns the line."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    return assert_one_line(err)


SMALL = ["--data-dir", DATA, "--train-size", 512, "--test-size", 128, "--hidden", 32, "--latent", 4, "--epochs", 1,
         "--progress", "off"]  # fmt: skip


@pytest.mark.parametrize(
    "flags,fragments",
    [
        (["--train-size", 60001], ["train_size", "60001", "60000"]),
        (["--test-size", 10001], ["test_size", "10001", "10000"]),
    ],
    ids=["train", "test"],
)
def test_sizes_beyond_the_data_set_are_refused(flags, fragments, capsys, tmp_path):
    line = main_error(capsys, "train", *SMALL, *flags, "--out", tmp_path / "run")
    for f in fragments:
        assert f in line, line
    assert not (tmp_path / "run").exists()


def test_evaluate_sizes_beyond_the_test_set_or_zero_are_refused(reference, capsys):
    line = main_error(capsys, "evaluate", reference["checkpoint"], "--iwae-k", 2, "--n-test", 10001)
    assert "10001" in line and "10000" in line, line
    assert "--n-test" in main_error(capsys, "evaluate", reference["checkpoint"], "--n-test", 0)


def test_a_batch_larger_than_the_training_set_is_one_step_per_epoch(capsys, tmp_path):
    assert main(["train", *map(str, SMALL), "--epochs", "2", "--batch-size", "1000", "--out", str(tmp_path / "r")]) == 0
    ckpt = load_checkpoint(tmp_path / "r" / T.CHECKPOINT)
    assert ckpt.meta["optimizer"]["t"] == 2  # one update per epoch, on all 512 images


def test_flags_that_used_to_be_guessed_are_refused(reference, capsys, tmp_path):
    from scratchvae.engines.blas import cpu_count

    out = tmp_path / "run"
    for argv, fragment in [
        (["train", *SMALL, "--hidden", "400,,200"], "got '400,,200'"),  # not read as 400,200
        (["train", *SMALL, "--threads", cpu_count() + 1], f"more than the {cpu_count()} CPUs"),
        (["train", *SMALL, "--epoch", 3], "unrecognized arguments: --epoch 3"),  # no abbreviation of --epochs
        (["train", *SMALL, "--resume", "--overwrite"], "exclude each other"),
        (["sample", reference["checkpoint"], "--out", tmp_path / "s.jpg"], "must end in .png"),
    ]:
        if argv[0] == "train":
            argv = [*argv, "--out", out]
        assert fragment in main_error(capsys, *argv)
    assert not out.exists() and not (tmp_path / "s.jpg").exists()


def test_data_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "mnist.gz").write_bytes(b"")
    line = main_error(capsys, "train", *SMALL, "--data-dir", tmp_path / "mnist.gz", "--out", tmp_path / "r")
    assert "is not a directory" in line and "mnist.gz" in line


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_out_that_is_or_lies_below_a_file(where, capsys, tmp_path):
    (tmp_path / "taken").write_text("keep me")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    line = main_error(capsys, "train", *SMALL, "--out", out)
    assert str(out) in line and "run folder" in line, line
    assert (tmp_path / "taken").read_text() == "keep me"


class _Planted:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _meta_bytes(meta):
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def wrong_format_file(kind, tmp_path, reference):
    """A file that is not a usable checkpoint, of the given kind; returns its path."""
    good = load_checkpoint(reference["checkpoint"])
    path = tmp_path / f"{kind.replace(' ', '_')}.npz"
    meta = {"format": "scratchvae-checkpoint", "version": 1, **good.meta}
    if kind == "directory":
        path.mkdir()
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("params = [1, 2, 3]\n")
    elif kind == "single npy array":
        with open(path, "wb") as f:
            np.save(f, good.params)
    elif kind == "png image":
        path.write_bytes(reference["checkpoint"].with_name("samples.png").read_bytes())
    elif kind == "npz of other arrays":
        np.savez(path, x_train=np.zeros((3, 4)), labels=np.arange(3))
    elif kind == "npz without meta":
        np.savez(path, params=good.params)
    elif kind == "npz of another program":
        np.savez(path, params=good.params, **{"meta.json": _meta_bytes({"format": "other", "version": 1})})
    elif kind == "newer format version":
        np.savez(path, params=good.params, **{"meta.json": _meta_bytes({**meta, "version": VERSION + 1})})
    elif kind == "integer params":
        np.savez(path, params=good.params.astype(np.int32), **{"meta.json": _meta_bytes(meta)})
    elif kind == "object params":
        np.savez(path, params=np.array([_Planted(tmp_path / "pwned")], dtype=object),
                 **{"meta.json": _meta_bytes(meta)})  # fmt: skip
    elif kind == "object extra array":
        np.savez(path, params=good.params, opt_m=np.array([_Planted(tmp_path / "pwned")], dtype=object),
                 **{"meta.json": _meta_bytes(meta)})  # fmt: skip
    elif kind == "object meta":
        np.savez(path, params=good.params, **{"meta.json": np.array([_Planted(tmp_path / "pwned")], dtype=object)})
    else:
        raise AssertionError(kind)
    return path


WRONG_FORMATS = [
    "directory", "empty file", "text", "png image", "single npy array", "npz of other arrays", "npz without meta",
    "npz of another program",
    "newer format version", "integer params", "object params", "object extra array", "object meta",
]  # fmt: skip


@pytest.mark.parametrize("kind", WRONG_FORMATS)
def test_checkpoints_of_the_wrong_format_are_one_line_and_never_unpickled(kind, reference, capsys, tmp_path):
    path = wrong_format_file(kind, tmp_path, reference)
    marker = tmp_path / "pwned"
    if kind.startswith("object"):  # the planted object does run code when unpickled...
        with np.load(path, allow_pickle=True) as z:
            [z[name] for name in z.files]
        assert marker.exists()
        marker.unlink()
    with pytest.raises(CheckpointError) as excinfo:  # ...but the loader never unpickles
        load_checkpoint(path)
    said = str(excinfo.value)
    assert "\n" not in said and path.name in said
    assert "pickle" not in said.lower(), said  # the way on is never to load it unsafely
    if kind == "directory":
        assert "not a file" in said
    what = {"text": "a text file", "png image": "a PNG image", "single npy array": "a single NumPy array",
            "npz of other arrays": "an .npz archive of other arrays (labels, x_train)"}  # fmt: skip
    if kind in what or kind.startswith("object"):  # what it is, and what was expected
        assert what.get(kind, "holds Python objects") in said and "not a scratchvae checkpoint" in said, said
        assert "expected the checkpoint.npz that scratchvae train writes" in said, said
    main_error(capsys, "evaluate", path, "--iwae-k", 2, "--n-test", 4)
    main_error(capsys, "sample", path, "--out", tmp_path / "s.png")
    assert not marker.exists()
    assert not (tmp_path / "s.png").exists()


def _set(meta, dotted, value):
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


class _Delete:
    def __repr__(self):
        return "<deleted>"


DELETE = _Delete()  # as a value in the tables below: remove the key

def _with_meta_changed(source, key, value, path):
    """A copy of the checkpoint ``source`` at ``path`` with one metadata entry set (``_set``); returns ``path``."""
    good = load_checkpoint(source)
    meta = copy.deepcopy(good.meta)
    _set(meta, key, value)
    np.savez(path, params=good.params, **good.arrays, **{"meta.json": _meta_bytes(meta)})
    return path


BAD_MODEL_META = [
    ("model", DELETE), ("model", "VAE"), ("model.model", "GAN"), ("model.input_dim", DELETE),
    ("model.input_dim", "784x"), ("model.input_dim", float("inf")), ("model.hidden", "wide"),
    ("model.hidden", [32, -1]), ("model.latent_dim", 0), ("model.likelihood", "poisson"),
    ("model.activation", ["relu"]), ("model.dtype", "float16"), ("model.seed", -1), ("model.gaussian_log_var", None),
    ("model.unknown_option", 1), ("format", DELETE), ("version", "1"),
]  # fmt: skip


@pytest.mark.parametrize("key,value", BAD_MODEL_META, ids=[f"{k}={v!r}"[:40] for k, v in BAD_MODEL_META])
def test_checkpoint_with_bad_model_meta_is_one_line(key, value, reference, capsys, tmp_path):
    path = _with_meta_changed(reference["checkpoint"], key, value, tmp_path / "bad.npz")
    with pytest.raises(CheckpointError):
        restore_model(load_checkpoint(path))
    main_error(capsys, "sample", path, "--out", tmp_path / "s.png")


BAD_TRAIN_META = [("train", [1, 2]), ("train.binarize", "sometimes"), ("train.data_dir", 5)]


@pytest.mark.parametrize("key,value", BAD_TRAIN_META, ids=[f"{k}={v!r}" for k, v in BAD_TRAIN_META])
def test_evaluate_with_bad_training_configuration_is_one_line(key, value, reference, capsys, tmp_path):
    path = _with_meta_changed(reference["checkpoint"], key, value, tmp_path / "bad.npz")
    if key == "train.data_dir":  # an ill-typed hint is ignored: the data is found as usual
        assert main(["evaluate", str(path), "--iwae-k", "2", "--n-test", "4", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n_test"] == 4
    else:
        assert str(path) in main_error(capsys, "evaluate", path, "--iwae-k", 2, "--n-test", 4)


BAD_TRAINING_STATE = [
    ("train", DELETE), ("train", [1, 2]), ("epoch", DELETE), ("epoch", "one"), ("epoch", 0), ("epoch", 1.5),
    ("epoch", 2**63), ("step", -1), ("step", N_STEPS + 1), ("step", True), ("optimizer", None), ("optimizer.t", -5),
    ("optimizer.t", "3"), ("rng", DELETE), ("rng.data", "seed"), ("rng.data.state.state", -1),
    ("rng.noise.bit_generator", "MT19937"), ("stats", []), ("stats.n", "24"), ("stats.n", 23),
    ("stats.loss", None), ("stats.spare", 0), ("history", "abc"), ("history", [{"epoch": 1}]),
    ("perm", DELETE), ("model.hidden", "wide"),
]  # fmt: skip


@pytest.mark.parametrize("key,value", BAD_TRAINING_STATE, ids=[f"{k}={v!r}"[:40] for k, v in BAD_TRAINING_STATE])
def test_resume_from_bad_training_state_is_one_line(key, value, midway, capsys, tmp_path):
    """A mid-epoch checkpoint (epoch 1, step 3) with one piece of training state missing or of the wrong type.

    The line names the checkpoint (``--out`` names it only implicitly) and the run writes nothing.
    """
    _, data = midway
    out = tmp_path / "run"
    out.mkdir()
    (out / T.CHECKPOINT).write_bytes(data)
    ckpt = load_checkpoint(out / T.CHECKPOINT)
    meta, arrays = copy.deepcopy(ckpt.meta), dict(ckpt.arrays)
    if key == "perm":
        del arrays["perm"]
    else:
        _set(meta, key, value)
    np.savez(out / T.CHECKPOINT, params=ckpt.params, **arrays, **{"meta.json": _meta_bytes(meta)})
    line = main_error(capsys, "train", *FLAGS, "--epochs", 1, "--out", out, "--resume")
    assert str(out / T.CHECKPOINT) in line, line
    assert metrics_rows(out) == []


# ------------------------------------------------------------------------------------------
# 6. Fuzzing: damaged bytes, ill-typed metadata, random command lines.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory for files written inside hypothesis tests (module-scoped, so hypothesis accepts it)."""
    return tmp_path_factory.mktemp("fuzz")


def tiny_checkpoint():
    """A checkpoint laid out as the trainer writes it, small enough that most bytes are structure: bytes, contents."""
    model = VAE(6, hidden=(3,), latent_dim=2, dtype="float32")
    opt = Adam(model)
    meta = {"model": model.config(), "epoch": 1, "step": 2, "optimizer": {"name": "adam", "t": 2},
            "rng": {"noise": model.rng.get_state()}, "stats": {"n": 4}, "history": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "tiny.npz", model.params, meta,
                               {"opt_m": opt.m, "opt_v": opt.v, "perm": np.arange(8)})  # fmt: skip
        return path.read_bytes(), load_checkpoint(path)


TINY, TINY_CHECKPOINT = tiny_checkpoint()


def load_or_refuse(path):
    """``load_checkpoint`` then ``restore_model``: the checkpoint, or None after a CheckpointError; nothing else."""
    try:
        ckpt = load_checkpoint(path)
        restore_model(ckpt)
        return ckpt
    except CheckpointError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


@st.composite
def damaged(draw, data=TINY):
    """``data`` after 1-3 edits: a cut, bit flips, bytes set, inserted or deleted."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["cut", "flip", "set", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "cut":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


def zip_field_edit(entry, offset, value, size=2):
    """``TINY`` with a little-endian field of the central directory record of entry ``entry`` set to ``value``."""
    data = bytearray(TINY)
    starts = [m.start() for m in re.finditer(b"PK\x01\x02", TINY)]
    at = starts[entry] + offset
    data[at : at + size] = value.to_bytes(size, "little")
    return bytes(data)


# Central directory record: version needed at offset 6, flags at 8, compression method at 10.
@given(data=st.one_of(damaged(), st.binary(max_size=300),
                      st.sampled_from([b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY"]).flatmap(
                          lambda head: st.binary(max_size=200).map(lambda tail: head + tail))))  # fmt: skip
@example(data=TINY)
@example(data=b"")
@example(data=zip_field_edit(3, 8, 0x0001))  # the "encrypted" flag: zipfile raises RuntimeError
@example(data=zip_field_edit(0, 6, 0x00FF))  # a zip version from the future: NotImplementedError
@example(data=zip_field_edit(1, 10, 99))  # an unknown compression method: NotImplementedError
@example(data=zip_field_edit(1, 10, 8))  # deflate claimed for stored bytes: BadZipFile (bad CRC)
@example(data=zip_field_edit(1, 10, 12))  # bzip2 claimed: OSError without an errno
@example(data=zip_field_edit(1, 10, 14))  # lzma claimed
def test_damaged_checkpoint_bytes_load_or_raise_checkpoint_error(data, scratch):
    path = scratch / "damaged.npz"
    path.write_bytes(data)
    ckpt = load_or_refuse(path)
    event("refused" if ckpt is None else "loaded")
    if data == TINY:
        assert ckpt is not None
    if ckpt is not None:  # what loads is the whole original (the zip's CRCs cover every entry), never a mix
        original = TINY_CHECKPOINT
        assert np.array_equal(ckpt.params, original.params) and ckpt.meta == original.meta
        assert ckpt.arrays.keys() == original.arrays.keys()
        assert all(np.array_equal(ckpt.arrays[k], original.arrays[k]) for k in original.arrays)


def test_the_tiny_checkpoint_has_the_trainer_layout():
    """What the zip field edits above rely on: five entries, each with a central directory record."""
    with zipfile.ZipFile(io.BytesIO(TINY)) as z:
        names = [i.filename for i in z.infolist()]
    assert names == ["params.npy", "opt_m.npy", "opt_v.npy", "perm.npy", "meta.json.npy"]
    assert len(re.findall(b"PK\x01\x02", TINY)) == len(names)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.text(max_size=4),
              st.sampled_from([0.5, -1.0, 1e300, float("inf"), float("nan"), 2**63, -(2**70)])),  # fmt: skip
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _similar(value):
    """JSON values of the same type as ``value`` and near it: the edits that slip past a type check."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(value - 3, value + 3)
    if isinstance(value, float):
        return st.floats(allow_nan=False, allow_infinity=False, width=64)
    if isinstance(value, str):
        return st.text(max_size=4)
    return json_values


@st.composite
def mutated(draw, tree):
    """A deep copy of a JSON ``tree`` with 1-3 values deleted, or replaced by similar or random JSON values."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        node = tree
        while True:
            keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            if isinstance(node, dict) and draw(st.integers(0, 2)) == 0:
                del node[key]
            else:
                node[key] = draw(st.one_of(_similar(child), json_values))
            break
    return tree


TINY_META = TINY_CHECKPOINT.meta  # with "format" and "version", so those are mutated too


@given(meta=mutated(TINY_META))
@example(meta={**TINY_META, "model": {**TINY_META["model"], "input_dim": float("inf")}})
@example(meta={**TINY_META, "model": {**TINY_META["model"], "hidden": [2**63]}})
def test_ill_typed_model_metadata_restores_or_raises_checkpoint_error(meta, scratch):
    path = scratch / "meta.npz"
    np.savez(path, params=TINY_CHECKPOINT.params, **TINY_CHECKPOINT.arrays, **{"meta.json": _meta_bytes(meta)})
    load_or_refuse(path)


@settings(max_examples=30)
@given(data=st.data())
def test_ill_typed_training_state_resumes_or_raises_checkpoint_error(data, midway):
    """Resuming from a mid-epoch checkpoint with mutated metadata: a CheckpointError, or the epoch finishes."""
    run, good = midway
    path = run.out / T.CHECKPOINT
    path.write_bytes(good)
    ckpt = load_checkpoint(path)
    kept = ("format", "version", "model")  # what load_checkpoint and restore_model check (tested above)
    bad = data.draw(mutated({k: v for k, v in ckpt.meta.items() if k not in kept}))
    bad.update({k: ckpt.meta[k] for k in kept})
    np.savez(path, params=ckpt.params, **ckpt.arrays, **{"meta.json": _meta_bytes(bad)})
    try:
        run.restore()
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        event("refused")
        return
    event("resumed")
    run.cfg.epochs = run.epoch  # what restore accepted must carry the run through its epoch end
    run.cfg.resume = True  # (run() restores it again, as --resume does)
    run.run()
    assert [r["epoch"] for r in metrics_rows(run.out)] == list(range(1, run.epoch))


# Flags of each command with values to draw from: valid ones and near misses.
_ANY = st.text(max_size=6)
VALUES = {
    "int": st.one_of(st.integers(-3, 3000).map(str), st.sampled_from(["1e3", "0x10", "", " 7", "9" * 30]), _ANY),
    "float": st.one_of(st.sampled_from(["1e-3", "0", "-1", "nan", "inf", "1e-400", "1e308", "3", ".5"]), _ANY),
    "hidden": st.one_of(st.sampled_from(["400", "200,200", "0", ",", "", "1,,2", "x", "-3"]), _ANY),
    "text": _ANY,
}


def _value_kind(action):
    if action.choices:
        return st.one_of(st.sampled_from(sorted(map(str, action.choices))), _ANY)
    name = getattr(action.type, "__name__", "")
    if name.endswith("_int"):
        return VALUES["int"]
    if name.endswith("_float"):
        return VALUES["float"]
    if name == "layer_sizes":
        return VALUES["hidden"]
    return VALUES["text"]


def _commands():
    sub = build_parser()._subparsers._group_actions[0].choices
    table = {}
    for name, parser in sub.items():
        flags = []
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flags.append((action.option_strings[-1], None if action.nargs == 0 else _value_kind(action)))
        positional = [a for a in parser._actions if not a.option_strings]
        table[name] = (flags, bool(positional))
    return table


COMMANDS = _commands()


@st.composite
def command_lines(draw):
    name = draw(st.sampled_from(sorted(COMMANDS) + ["frobnicate"]))
    flags, positional = COMMANDS.get(name, ([], False))
    argv = [name]
    if positional and draw(st.booleans()):
        argv.append(draw(st.sampled_from(["checkpoint.npz", "runs/a/checkpoint.npz"])))
    for _ in range(draw(st.integers(0, 5))):
        if flags and draw(st.integers(0, 5)):
            flag, values = draw(st.sampled_from(flags))
            argv.append(flag)
            if values is not None and draw(st.integers(0, 8)):
                argv.append(draw(values))
        else:
            argv.append(draw(st.text(max_size=8)))  # a stray word, maybe dash-led
    # -h / --help (or a prefix like --he) print help and exit 0, by design; they are not bad input
    return [a for a in argv if not (a.startswith("-h") or (len(a) >= 3 and "--help".startswith(a)))]


class _Built(Exception):
    pass


def _build_only(cfg, progress=None):
    """Stands in for ``train``: checks the configuration as ``Run`` does first, then stops."""
    try:
        cfg.validate()
    except ValueError as exc:  # main prints it as one line with status 2
        assert "\n" not in str(exc)
    raise _Built


@given(argv=command_lines())
@example(argv=["train", "--lr", "1e-400"])
@example(argv=["train", "--seed", "9" * 5000])
@example(argv=["train", "--hidden", ",,"])
@example(argv=["train", "\n"])  # argparse quotes the unknown argument: still one line
def test_random_command_lines_parse_or_raise_usage_error(argv):
    """``main``'s parsing step gives a namespace or a UsageError; an accepted train line builds a config that
    validates or raises ValueError (combinations the parser cannot see, like ``--k 5`` with the elbo)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        assert "\n" not in str(exc)
        event("usage error")
        return
    assert isinstance(args, argparse.Namespace) and args.command in COMMANDS
    event(f"parsed {args.command}")
    if args.command == "train":
        with mock.patch.object(T, "train", _build_only):
            try:
                cmd_train(args)
            except UsageError as exc:  # what the parser cannot check alone: --threads beyond the CPUs
                assert "\n" not in str(exc) and "--threads" in str(exc)
            except _Built:
                pass
            else:
                raise AssertionError("cmd_train returned without training")



# ------------------------------------------------------------------------------------------
# 7. No run is lost: used folders are refused, one run per folder at a time, signals anywhere.
# ------------------------------------------------------------------------------------------


def folder_bytes(folder):
    """Every file of a run folder (but its lock file) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != FolderLock.NAME}


@pytest.mark.slow
def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(reference, tmp_path):
    out = tmp_path / "run"
    status, _, stderr = run_train(out)
    assert status == 0, stderr
    before = folder_bytes(out)
    status, _, stderr = run_train(out, "--latent", 2)
    assert status == 2
    line = assert_one_line(stderr)
    assert line == (f"scratchvae: error: {out} already holds a run (2 of 2 epochs done); continue it with --resume, "
                    "start over with --overwrite (which deletes it), or choose another --out")  # fmt: skip
    assert folder_bytes(out) == before  # byte for byte

    status, stdout, stderr = run_train(out, "--latent", 2, "--overwrite")  # starting over is asked for by name
    assert status == 0, stderr
    assert f"overwriting the run in {out} (2 of 2 epochs done)" in stdout
    assert load_checkpoint(out / T.CHECKPOINT).meta["train"]["latent_dim"] == 2
    assert [r["epoch"] for r in metrics_rows(out)] == [1, 2]


def test_a_used_folder_is_described_by_its_position(midway, tmp_path):
    run, good = midway
    out = tmp_path / "run"
    out.mkdir()
    assert T.describe_run(out) is None
    (out / T.METRICS).write_text("")  # what a run interrupted during start-up leaves: not a run
    assert T.describe_run(out) is None
    (out / T.CHECKPOINT).write_bytes(good)
    assert T.describe_run(out) == "0 of 1 epochs done, checkpoint at epoch 1, step 3"
    (out / T.CHECKPOINT).write_bytes(good[:100])
    (out / T.METRICS).write_text("{}\n")
    assert T.describe_run(out) == "1 epoch in metrics.jsonl, and a checkpoint.npz that cannot be read"


HOLD_LOCK = """
import sys, time
from scratchvae.files import FolderLock
with FolderLock(sys.argv[1], "training run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(folder):
    """A process that holds ``folder``'s lock until killed (returned once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=cli_env())  # fmt: skip
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_run_in_a_folder_another_process_holds_is_refused_with_its_pid(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out)
    try:
        line = main_error(capsys, "train", *SMALL, "--out", out)
        assert line == f"scratchvae: error: {out} is in use by another training run (pid {holder.pid})"
        assert folder_bytes(out) == {}
        with pytest.raises(OSError, match=f"pid {holder.pid}"):  # --resume and --overwrite too
            T.Run(T.TrainConfig(**{**small_config(out).__dict__, "overwrite": True}), log=quiet).run()
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: nothing stale blocks the folder
    assert main(["train", *map(str, SMALL), "--out", str(out)]) == 0
    assert [r["epoch"] for r in metrics_rows(out)] == [1]


@pytest.mark.slow
def test_two_runs_started_together_one_completes_the_other_is_refused(reference, tmp_path):
    out = tmp_path / "run"
    first, second = start_train(out), start_train(out, "--latent", 2)
    results = [(p, *p.communicate(timeout=300)) for p in (first, second)]
    done = [r for r in results if r[0].returncode == 0]
    refused = [r for r in results if r[0].returncode == 2]
    assert len(done) == 1 and len(refused) == 1, [(p.returncode, err) for p, _, err in results]
    line = assert_one_line(refused[0][2])
    winner = done[0][0]
    assert line in (f"scratchvae: error: {out} is in use by another training run (pid {winner.pid})",
                    f"scratchvae: error: {out} already holds a run (2 of 2 epochs done); continue it with --resume, "
                    "start over with --overwrite (which deletes it), or choose another --out"), line  # fmt: skip
    if winner is first:
        assert_same_as_reference(out, reference)
    else:
        assert load_checkpoint(out / T.CHECKPOINT).meta["train"]["latent_dim"] == 2
        assert [r["epoch"] for r in metrics_rows(out)] == [1, 2]


def signal_handled(pid, signum) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to see the handler")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_exits_quietly(signum, tmp_path):
    out = tmp_path / "run"
    proc = start_train(out)
    wait_for(lambda: signal_handled(proc.pid, signal.SIGTERM), proc, timeout=30)  # our handlers are in place
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, stderr
    assert not (out / T.CHECKPOINT).exists()


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(delay=st.floats(0.1, 0.8), signum=st.sampled_from([signal.SIGINT, signal.SIGTERM]))
@example(delay=0.78125, signum=signal.SIGINT)  # once came as the process exited: it died of SIGINT (status -2)
def test_a_signal_at_any_moment_then_resume_loses_nothing(delay, signum, reference, tmp_path_factory):
    """Whenever SIGINT or SIGTERM comes (start-up, an epoch, an evaluation, a checkpoint write), the run stops
    with one line or none, and ``--resume`` then ends bitwise where an uninterrupted run ends."""
    out = tmp_path_factory.mktemp("signal") / "run"
    proc = start_train(out, "--checkpoint-every", 8)
    time.sleep(delay)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 128 + signum), stderr  # 0: it had finished
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, stderr
    event(f"status {proc.returncode}, {'no checkpoint' if not (out / T.CHECKPOINT).exists() else 'checkpoint'}")
    status, _, stderr = run_train(out, "--checkpoint-every", 8, "--resume")
    assert status == 0, stderr
    assert_same_as_reference(out, reference)


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(first=st.sampled_from([[], ["--overwrite"], ["--resume"]]),
       second=st.sampled_from([[], ["--overwrite"], ["--resume"]]),
       latent=st.sampled_from([4, 2]), together=st.booleans())  # fmt: skip
def test_pairs_of_runs_in_one_folder_never_lose_or_mix_a_run(first, second, latent, together, reference,
                                                              tmp_path_factory):  # fmt: skip
    """Two runs into one folder, one after the other or at once, with any of --resume/--overwrite: each ends
    with status 0 or one line and status 2; a refused run changes nothing; the folder holds one whole run."""
    out = tmp_path_factory.mktemp("pair") / "run"
    a = start_train(out, *first)
    if not together:
        a.communicate(timeout=300)
        assert a.returncode == 0
        before = folder_bytes(out)
    b = start_train(out, "--latent", latent, *second)
    results = {name: (p, *p.communicate(timeout=300)) for name, p in (("a", a), ("b", b)) if p.returncode is None}
    for name, (p, _, stderr) in results.items():
        assert p.returncode in (0, 2), stderr
        if p.returncode == 2:
            assert_one_line(stderr)
    if not together and b.returncode == 2:
        assert folder_bytes(out) == before
    event(f"a {a.returncode}, b {b.returncode}")
    final = load_checkpoint(out / T.CHECKPOINT)
    assert (final.meta["epoch"], final.meta["step"]) == (EPOCHS + 1, 0)
    assert [r["epoch"] for r in metrics_rows(out)] == [1, 2]
    winners = [4] * (a.returncode == 0) + [latent] * (b.returncode == 0)
    assert final.meta["train"]["latent_dim"] in winners
    if final.meta["train"]["latent_dim"] == 4:
        assert_same_as_reference(out, reference)


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """``scratchvae train | head -1``: once the reader is gone, the run stops with SIGPIPE's status and no message."""
    proc = start_train(tmp_path / "run")
    proc.stdout.close()  # the reader goes away before the first line
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE, stderr
    assert stderr == ""


def test_an_ignored_sigint_inherited_from_the_caller_stays_ignored(reference, tmp_path):
    """``cmd &`` in a script starts the process with SIGINT ignored; scratchvae keeps it so, as Python does."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "scratchvae", "train", *FLAGS, "--out", str(out)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    wait_for(lambda: signal_handled(proc.pid, signal.SIGTERM), proc, timeout=30)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert_same_as_reference(out, reference)
