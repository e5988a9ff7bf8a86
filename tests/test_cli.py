"""The command line, run as a user runs it: in a subprocess, on a small slice of MNIST."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scratchvae.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--train-size", "256", "--test-size", "64", "--hidden", "32", "--latent", "2", "--batch-size", "64"]


def cli(*args, cwd=None, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "scratchvae", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=300,
    )  # fmt: skip


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("scratchvae: error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = cli("train", "--epochs", "2", *SMALL, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_writes_the_run_folder_and_says_where(trained):
    out, proc = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for name in ("checkpoint.npz", "samples.png", "reconstructions.png", "loss.png", "manifold.png", "latent.png"):
        assert (out / name).is_file(), name
    assert "epoch   2/2" in proc.stdout
    assert str(out) in proc.stdout and "samples.png" in proc.stdout


def test_evaluate_json_reports_elbo_and_iwae_nll(trained):
    out, _ = trained
    proc = cli("evaluate", out / "checkpoint.npz", "--iwae-k", "50", "--n-test", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n_test"] == 40 and result["iwae_k"] == 50
    # the IWAE bound is tighter than the ELBO: NLL below the negative ELBO
    assert 0 < result["nll"] < result["test_loss"]
    text = cli("evaluate", out / "checkpoint.npz", "--iwae-k", "5", "--n-test", "10")
    assert text.returncode == 0 and "test NLL (IWAE, K=5)" in text.stdout


def test_sample_writes_a_png(trained, tmp_path):
    out, _ = trained
    target = tmp_path / "s.png"
    proc = cli("sample", out / "checkpoint.npz", "--n", "12", "--out", target)
    assert proc.returncode == 0, proc.stderr
    from png_reader import read_png

    assert read_png(target).shape == (2 * 30 + 2, 10 * 30 + 2)  # 12 samples: 2 rows of 10, 28 px + 2 px padding


def test_console_script_entry_point_is_declared():
    cfg = (REPO / "setup.cfg").read_text()
    assert "scratchvae = scratchvae.cli:main" in cfg


def test_help_explains_every_flag():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)
    proc = cli("train", "--help")
    assert proc.returncode == 0
    for flag in ("--data-dir", "--epochs", "--batch-size", "--lr", "--hidden", "--latent", "--activation",
                 "--likelihood", "--binarize", "--backend", "--dtype", "--seed", "--out", "--resume",
                 "--train-size", "--test-size", "--engine", "--threads"):  # fmt: skip
        assert flag in proc.stdout, flag


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--hidden", "400,x"], "--hidden"),
        (["train", "--hidden", "0"], "--hidden"),
        (["train", "--latent", "two"], "--latent"),
        (["train", "--binarize", "sometimes"], "--binarize"),
        (["train", "--backend", "tpu"], "--backend"),
        (["train", "--dtype", "float16"], "--dtype"),
        (["train", "--seed", "-3"], "--seed"),
        (["train", "--engine", "tpu"], "--engine"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
    ],
)
def test_nonsense_flags_get_one_line_and_status_2(args, fragment):
    assert_one_line_error(cli(*args), fragment)


def test_cupy_backend_without_a_gpu_is_one_clear_line(tmp_path):
    from scratchvae.backend import cupy_available

    if cupy_available()[0]:
        pytest.skip("a GPU is present here")
    proc = cli("train", *SMALL, "--epochs", "1", "--backend", "cupy", "--out", tmp_path / "r")
    assert_one_line_error(proc, "cupy")


def test_missing_data_is_one_line_naming_the_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("train", *SMALL, "--data-dir", empty, "--out", tmp_path / "r")
    assert_one_line_error(proc, "train-images-idx3-ubyte")


def test_corrupt_data_file_is_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (REPO / "data" / "mnist").glob("*.gz"):
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 3] if "train-images" in f.name else data)
    proc = cli("train", *SMALL, "--data-dir", bad, "--out", tmp_path / "r")
    assert_one_line_error(proc, "train-images-idx3-ubyte")


def test_truncated_checkpoint_is_one_line(trained, tmp_path):
    out, _ = trained
    data = (out / "checkpoint.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("evaluate", cut, "--iwae-k", "2", "--n-test", "4"), "truncated or corrupt")
    assert_one_line_error(cli("sample", cut), "truncated or corrupt")


def test_resume_with_an_incompatible_configuration_is_one_line(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.npz").write_bytes((out / "checkpoint.npz").read_bytes())
    small = [a if a != "32" else "16" for a in SMALL]  # --hidden 16 instead of 32
    proc = cli("train", "--epochs", "3", *small, "--out", run, "--resume")
    assert_one_line_error(proc, "hidden")


def test_init_flag_is_recorded_in_the_checkpoint(tmp_path):
    from scratchvae.checkpoint import load_checkpoint

    proc = cli("train", "--epochs", "1", *SMALL, "--init", "glorot", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "r" / "checkpoint.npz").meta["model"]["init"] == "glorot"
    assert_one_line_error(cli("train", "--init", "zeros"), "--init")


def test_model_and_run_flags_reach_the_checkpoint(tmp_path):
    """Every train flag that shapes the run is recorded where it took effect."""
    from scratchvae.checkpoint import load_checkpoint

    out = tmp_path / "r"
    proc = cli("train", "--epochs", "1", "--train-size", "256", "--test-size", "64", "--hidden", "24,12",
               "--latent", "3", "--batch-size", "50", "--lr", "0.02", "--optimizer", "sgd", "--dtype", "float64",
               "--activation", "tanh", "--likelihood", "gaussian_learned", "--binarize", "static",
               "--seed", "7", "--backend", "numpy", "--engine", "reference", "--progress", "on", "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = load_checkpoint(out / "checkpoint.npz").meta
    model, run = meta["model"], meta["train"]
    assert model["hidden"] == [24, 12] and model["decoder_hidden"] == [12, 24] and model["latent_dim"] == 3
    assert (model["activation"], model["likelihood"], model["dtype"], model["seed"]) == (
        "tanh", "gaussian_learned", "float64", 7)  # fmt: skip
    assert (run["batch_size"], run["lr"], run["optimizer"], run["binarize"]) == (50, 0.02, "sgd", "static")
    assert run["engine"] == "reference" and meta["step_threads"] == 1 and "engine reference" in proc.stdout
    assert meta["optimizer"]["t"] == 6  # ceil(256 / 50) steps
    assert "epoch 1/1" in proc.stderr  # the progress line, forced on without a terminal
    quiet = cli("train", "--epochs", "1", *SMALL, "--progress", "off", "--out", tmp_path / "q")
    assert quiet.returncode == 0 and "epoch 1/1" not in quiet.stderr


def test_engine_flag_chooses_the_step_and_threads_apply_to_the_cpu_engine(tmp_path):
    from scratchvae.checkpoint import load_checkpoint

    proc = cli("train", "--epochs", "1", *SMALL, "--engine", "cpu", "--threads", "2", "--out", tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    assert "engine cpu" in proc.stdout
    assert load_checkpoint(tmp_path / "c" / "checkpoint.npz").meta["step_threads"] == 2
    assert_one_line_error(cli("train", *SMALL, "--engine", "reference", "--threads", "2", "--out", tmp_path / "r"),
                          "threads", "engine 'cpu'")  # fmt: skip
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_evaluate_and_sample_flags_take_effect(trained, tmp_path):
    out, _ = trained
    ckpt = out / "checkpoint.npz"
    base = ["--iwae-k", "20", "--n-test", "30", "--backend", "numpy", "--data-dir", REPO / "data" / "mnist"]
    common = [*base, "--progress", "off", "--json"]
    a = json.loads(cli("evaluate", ckpt, *common, "--batch-size", "7", "--seed", "3").stdout)
    b = json.loads(cli("evaluate", ckpt, *common, "--batch-size", "30", "--seed", "3").stdout)
    c = json.loads(cli("evaluate", ckpt, *common, "--batch-size", "7", "--seed", "4").stdout)
    assert a["n_test"] == 30
    assert a["nll"] != c["nll"]  # the seed drives the evaluation noise
    assert abs(a["nll"] - b["nll"]) < 5 * (a["nll_stderr"] + 1e-9)  # batching changes the draws, not the estimate
    shown = cli("evaluate", ckpt, *base, "--progress", "on")
    assert shown.returncode == 0 and "IWAE K=20" in shown.stderr
    for seed, name in (("1", "a.png"), ("1", "b.png"), ("2", "c.png")):
        assert cli("sample", ckpt, "--n", "4", "--seed", seed, "--backend", "numpy", "--out", tmp_path / name).returncode == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
