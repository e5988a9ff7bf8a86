r"""Test log-likelihood of the one-stochastic-layer MNIST model of Burda, Grosse & Salakhutdinov (2015).

The setting of the IWAE paper's Table 1 (MNIST, one stochastic layer):

* encoder 784-200-200-(50 + 50), decoder 50-200-200-784, tanh hidden units,
  Glorot initialisation, a Bernoulli likelihood, dynamic binarization of
  the training images;
* Adam with :math:`\beta_1 = 0.9`, :math:`\beta_2 = 0.999`,
  :math:`\varepsilon = 10^{-4}`, minibatches of 20;
* their schedule: stages :math:`i = 0, \dots, 7` of :math:`3^i` passes over
  the 60,000 training images at learning rate :math:`10^{-3}\cdot 10^{-i/7}`,
  3,280 passes in all;
* objective ``--objective elbo`` (the VAE, one sample, analytic KL) or
  ``--objective iwae --k K``;
* after each stage, the test negative log-likelihood estimated by the
  importance-weighted bound with :math:`K = 5000` samples
  (:func:`scratchvae.evaluate.evaluate_nll`) on the dynamically binarized test set.

The paper's figures after the whole schedule: VAE (k = 1) 86.76 nats, IWAE
k = 5 85.54, k = 50 84.78 (IWAE with k = 1 is the VAE, 86.76). Each stage's
result is printed beside them.

Training goes through :class:`scratchvae.train.Run` (its minibatch loop, its
random streams and its checkpoint), with the optimiser replaced by an Adam
with :math:`\varepsilon = 10^{-4}` and the learning rate set at the start of
every pass from the schedule. The run folder ``--out`` keeps the checkpoint
after every pass: the same command again, with a larger ``--max-passes`` or
none, continues the schedule exactly where it stopped (the same parameters,
noise and data order as a run that never stopped); an interrupted pass is
redone from its start.

Results: ``<results-dir>/quality-<objective>-k<K>.jsonl`` holds one row per
evaluated stage (``passes`` done, ``wall_s``: seconds of training and
evaluation so far, summed over passes and across resumes, ``test_nll`` and
its standard error, ``lr``, the paper's figure, ...) and ``.md`` a table of
them; both are rewritten from the checkpoint's history after every stage, so
a resumed run never duplicates a row. Every pass also logs the one-sample
test ELBO, as ``scratchvae train`` does.

    python benchmarks/quality.py --objective iwae --k 5            # the recorded run
    python benchmarks/quality.py --max-passes 1 --train-size 2000 --n-test 200 --eval-k 50 \
        --out /tmp/q --results-dir /tmp/q                          # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # this checkout's scratchvae, whatever else is installed

N_STAGES = 8
BASE_LR = 1e-3
BATCH_SIZE = 20
ADAM = dict(betas=(0.9, 0.999), eps=1e-4)
ARCHITECTURE = dict(hidden=(200, 200), latent_dim=50, activation="tanh", init="glorot",
                    likelihood="bernoulli", binarize="dynamic", dtype="float32")  # fmt: skip
# Burda, Grosse & Salakhutdinov (2015), Table 1, MNIST, one stochastic layer: test NLL in nats.
PAPER = {("elbo", 1): 86.76, ("iwae", 1): 86.76, ("iwae", 5): 85.54, ("iwae", 50): 84.78}
PAPER_TEXT = "paper: VAE 86.76, IWAE k=5 85.54, k=50 84.78"


def schedule():
    """``[(stage, first_pass, last_pass, lr), ...]``: stage ``i`` is ``3**i`` passes at ``1e-3 * 10**(-i/7)``.

    Passes are numbered from 1; the stages end at passes 1, 4, 13, 40, 121, 364, 1093, 3280.
    """
    stages, first = [], 1
    for i in range(N_STAGES):
        n = 3**i
        stages.append((i, first, first + n - 1, BASE_LR * 10 ** (-i / 7)))
        first += n
    return stages


TOTAL_PASSES = schedule()[-1][2]  # 3280


def stage_of(pass_number: int):
    """The ``(stage, first_pass, last_pass, lr)`` that pass ``pass_number`` (1-based) belongs to."""
    for entry in schedule():
        if entry[1] <= pass_number <= entry[2]:
            return entry
    raise ValueError(f"pass {pass_number} is outside the schedule (1..{TOTAL_PASSES})")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=["elbo", "iwae"], default="elbo", help="training objective (default elbo)")
    p.add_argument("--k", type=int, default=1, help="importance samples of the iwae objective (default 1)")
    p.add_argument("--eval-k", type=int, default=5000, help="importance samples of the test NLL (default 5000)")
    p.add_argument("--n-test", type=int, default=None, help="evaluate on the first N test images (default all 10,000)")
    p.add_argument("--max-passes", type=int, default=TOTAL_PASSES,
                   help=f"stop after this many passes in all (default {TOTAL_PASSES}, the whole schedule; "
                        "stages end at passes 1, 4, 13, 40, 121, 364, 1093, 3280); run again to continue")  # fmt: skip
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images (default all 60,000)")
    p.add_argument("--out", default=None, help="run folder with the checkpoint (default runs/quality-<objective>-k<K>)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help=f"where the .jsonl and .md go (default {RESULTS_DIR})")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST files (as for scratchvae train)")
    p.add_argument("--backend", default=None, help="numpy, cupy or auto (default $SCRATCHVAE_BACKEND or numpy)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random stream (default 0)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress line on stderr")
    return p


def results_paths(results_dir, objective, k):
    stem = Path(results_dir) / f"quality-{objective}-k{k}"
    return stem.with_suffix(".jsonl"), stem.with_suffix(".md")


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min" if seconds < 36000 else f"{seconds / 3600:.1f} h"


def write_results(rows, jsonl, md, objective, k, device):
    """Rewrite the stage rows as JSON lines and as a markdown table."""
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paper = PAPER.get((objective, k))
    name = "VAE (elbo)" if objective == "elbo" else f"IWAE k={k}"
    lines = [
        f"# {name}: test NLL through the schedule of Burda et al. (2015)",
        "",
        "784-200-200-50 tanh encoder and decoder, Bernoulli, dynamic binarization, Adam (0.9, 0.999, eps 1e-4), "
        f"minibatch 20, on {device}. Test NLL: importance-weighted bound, mean +- standard error over test images.",
        f"Paper after 3280 passes: {paper if paper is not None else 'not reported'} nats ({PAPER_TEXT}).",
        "",
        "| stage | passes | lr | train loss (last pass) | test NLL (nats) | eval K | test images | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['passes']} | {r['lr']:.3g} | {r['train_loss']:.2f} | "
            f"{r['test_nll']:.2f} +- {r['test_nll_stderr']:.2f} | {r['eval_k']} | {r['n_test']} | "
            f"{_duration(r['wall_s'])} |"
        )
    md.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    from scratchvae.checkpoint import CheckpointError
    from scratchvae.data import DataError
    from scratchvae.train import TrainingDiverged

    try:
        return _main(build_parser().parse_args(argv))
    except (CheckpointError, DataError, ValueError) as exc:  # a bad flag, data file or checkpoint: one line
        print(f"quality.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"quality.py: error: training diverged: {exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    from scratchvae.backend import backend_name, device_name
    from scratchvae.optim import Adam
    from scratchvae.cli import progress_factory
    from scratchvae.evaluate import evaluate_elbo, evaluate_nll
    from scratchvae.train import CHECKPOINT, EpochStats, Run, TrainConfig

    for name in ("k", "eval_k", "max_passes", "n_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    out = Path(args.out or f"runs/quality-{args.objective}-k{args.k}")
    cfg = TrainConfig(
        data_dir=args.data_dir, epochs=TOTAL_PASSES, batch_size=BATCH_SIZE, lr=BASE_LR, optimizer="adam",
        objective=args.objective, k=args.k, backend=args.backend, seed=args.seed, out=str(out),
        train_size=args.train_size, **ARCHITECTURE,
    )  # fmt: skip
    run = Run(cfg, progress=progress_factory(args.progress))
    run.opt = Adam(run.model, lr=BASE_LR, **ADAM)  # the paper's eps; the trainer's Adam has 1e-8
    if (out / CHECKPOINT).exists():
        run.restore()  # refuses a checkpoint of another configuration
        print(f"resuming {out} after pass {run.epoch - 1}")
    test_x = run.test_x[: args.n_test]
    device = f"{backend_name(run.xp)} ({device_name(run.xp)})"
    jsonl, md = results_paths(args.results_dir, args.objective, args.k)
    paper = PAPER.get((args.objective, args.k))
    last = min(args.max_passes, TOTAL_PASSES)
    print(f"{args.objective} k={args.k}: {run.model.n_params:,} parameters, {len(run.train_x):,} training images, "
          f"passes {run.epoch}..{last} of {TOTAL_PASSES}, {device}")  # fmt: skip
    while run.epoch <= last:
        t0 = time.perf_counter()
        stage, _, stage_end, lr = stage_of(run.epoch)
        run.opt.lr = lr
        metrics = run.train_epoch(lambda: False)
        test = evaluate_elbo(run.model, test_x, cfg.binarize, cfg.seed)  # one-sample test ELBO, as the trainer logs
        row = {"epoch": run.epoch, "stage": stage, "lr": lr, **metrics, "test_loss": test["loss"],
               "recon": test["recon"], "kl": test["kl"]}  # fmt: skip
        print(f"pass {run.epoch:4d}/{TOTAL_PASSES} (stage {stage}, lr {lr:.3g})  train loss {metrics['train_loss']:8.3f}  "
              f"test -ELBO {test['loss']:8.3f}  {metrics['seconds']:7.1f} s")  # fmt: skip
        if run.epoch == stage_end:
            t_eval = time.perf_counter()
            nll, se = evaluate_nll(run.model, test_x, cfg.binarize, cfg.seed, k=args.eval_k)
            row.update(test_nll=nll, test_nll_stderr=se, eval_k=args.eval_k, n_test=len(test_x),
                       eval_seconds=time.perf_counter() - t_eval)  # fmt: skip
        row["pass_wall_s"] = time.perf_counter() - t0  # training and evaluation of this pass
        row["wall_s"] = sum(r["pass_wall_s"] for r in run.history) + row["pass_wall_s"]
        run.history.append(row)
        run.epoch, run.step, run.perm, run.stats = run.epoch + 1, 0, None, EpochStats()
        run.save()
        if "test_nll" in row:
            rows = [{"stage": r["stage"], "passes": r["epoch"], "lr": r["lr"], "train_loss": r["train_loss"],
                     "test_nll": r["test_nll"], "test_nll_stderr": r["test_nll_stderr"], "eval_k": r["eval_k"],
                     "n_test": r["n_test"], "wall_s": r["wall_s"], "objective": args.objective, "k": args.k,
                     "train_size": len(run.train_x), "device": device, "paper_nll": paper}
                    for r in run.history if "test_nll" in r]  # fmt: skip
            write_results(rows, jsonl, md, args.objective, args.k, device)
            versus = f"paper {paper:.2f} after {TOTAL_PASSES} passes" if paper is not None else "no paper figure"
            print(f"stage {stage} done after {row['epoch']} passes: test NLL {row['test_nll']:.2f} +- "
                  f"{row['test_nll_stderr']:.2f} nats (K={args.eval_k}, {len(test_x)} images); {versus} "
                  f"({PAPER_TEXT}); {_duration(row['wall_s'])} so far; rows in {jsonl}")  # fmt: skip
    print(f"stopped after pass {run.epoch - 1} of {TOTAL_PASSES}; checkpoint in {out / CHECKPOINT}"
          + ("" if run.epoch > TOTAL_PASSES else "; run the same command (with a larger --max-passes) to continue"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
