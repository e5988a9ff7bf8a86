"""Which likelihood for real-valued data: the three on standardised 10-d data sets, side by side.

Three synthetic data sets of 5,000 examples, each 10 features standardised to
mean 0 and variance 1, drawn from a 2-d latent code ``z ~ N(0, I)``:

* ``smooth``: ``tanh(z A + b) + sin(z C) / 2`` plus noise of standard deviation 0.05;
* ``quantised``: the same without the noise, rounded to steps of 0.5 standard deviations
  (data recorded on a coarse scale);
* ``linear``: ``z' W`` with a 3-d ``z'`` plus noise of standard deviation 0.3 (a
  probabilistic PCA model, where the right answer is a linear decoder).

For each data set and likelihood, a VAE (hidden 400, latent 20, Adam 1e-3,
batch 128, seed 0) is fitted for ``--epochs`` epochs on the first 4,500 rows; the
table gives the negative ELBO of the last 500 rows (nats per example; a density, so it can
be negative) and the squared error of the reconstructions ``E[x|z=mu(x)]``
per feature (the data have variance 1, so 1 is what the mean alone achieves).

    python benchmarks/likelihoods.py --epochs 200   # -> benchmarks/results/likelihoods-10d.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import use_checkout

use_checkout()

import numpy as np  # noqa: E402

import scratchvae as sv  # noqa: E402

LIKELIHOODS = ("gaussian", "gaussian_learned")


def standardised(x):
    return (x - x.mean(0)) / x.std(0)


def data_sets(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    a, b, c = rng.normal(size=(2, 10)), rng.normal(size=10), rng.normal(size=(2, 10))
    smooth = np.tanh(z @ a + b) + 0.5 * np.sin(z @ c)
    linear = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 10)) + 0.3 * rng.normal(size=(n, 10))
    return {
        "smooth": standardised(smooth + 0.05 * rng.normal(size=smooth.shape)),
        "quantised": np.round(standardised(smooth) * 2) / 2,
        "linear": standardised(linear),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "likelihoods-10d.md"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for name, x in data_sets().items():
        for likelihood in LIKELIHOODS:  # (the bernoulli likelihood refuses data outside [0, 1])
            t0 = time.perf_counter()
            train, held_out = x[:4500], x[4500:]
            vae = sv.VAEEstimator(likelihood=likelihood, latent_dim=20, epochs=args.epochs, seed=0)
            vae.fit(train, validation=held_out)
            mse = float(((vae.reconstruct(held_out) - held_out) ** 2).mean())
            last = vae.history_[-1]
            rows.append((name, likelihood, last["test_loss"], last["test_kl"], mse, time.perf_counter() - t0))
            print(f"{name:9s} {likelihood:16s} test -ELBO {last['test_loss']:8.3f}  KL {last['test_kl']:6.3f}  "
                  f"squared error {mse:.4f}  ({rows[-1][-1]:.0f} s)", flush=True)  # fmt: skip
    lines = [
        f"# Likelihoods on standardised 10-d data ({args.epochs} epochs)",
        "",
        "`python benchmarks/likelihoods.py --epochs " + str(args.epochs) + "`; see the script's docstring for the data.",
        "",
        "| data | likelihood | test negative ELBO (nats) | test KL | reconstruction squared error per feature |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | `{lik}` | {loss:.3f} | {kl:.3f} | {mse:.4f} |" for n, lik, loss, kl, mse, _ in rows]
    if not args.no_save:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
