"""
What Ray Tune costs: the same trials run back to back with plain run_vae.train(), then as a tune_vae.py sweep.

    python bench/bench_tune.py                          # 3 trials x 2 epochs, 32x32 demo fruit, ~2 minutes on 2 cores
    python bench/bench_tune.py --trials 4 --epochs 3 --image_size 64

The sweep runs one trial at a time with the FIFO scheduler (no early stopping) and the trials' hyperparameters
given as points_to_evaluate, so both sides do exactly the same training (and, seeded, get the same numbers).
The plain side runs in this process with torch already imported, which makes it the fastest possible baseline:
the ratio is an upper bound on Ray's overhead. Everything is written to a temp folder and deleted afterwards.
These are wall times: on a busy shared machine (see the load average it prints) both sides slow down, and the
sweep, with more processes, can get a larger share of the CPUs than the single plain process.
"""
import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_vae  # noqa: E402
import tune_vae  # noqa: E402

TRIALS = [  # cycled through for --trials
    {"train.lr": 1.0e-3, "model.latent_dim": 16},
    {"train.lr": 2.0e-3, "model.latent_dim": 32},
    {"train.lr": 5.0e-4, "model.latent_dim": 16},
    {"train.lr": 2.0e-3, "model.latent_dim": 16},
]


def write_sweep(work, args, trials):
    spec = {
        "tune": {"name": "bench", "storage_path": str(work / "tune"), "num_samples": len(trials),
                 "max_concurrent_trials": 1, "cpus_per_trial": args.threads, "seed": 0,
                 "scheduler": {"type": "fifo"}, "points_to_evaluate": trials},
        "search_space": {key: {"choice": sorted({t[key] for t in trials})} for key in trials[0]},
        "run": {"log_dir": str(work / "logs"), "best_dir": str(work / "best")},
        "data": {"root": str(work / "data"), "image_size": args.image_size, "cache_dir": str(work / "cache")},
        "train": {"epochs": args.epochs, "batch_size": 32, "precision": "fp32", "sample_every": args.epochs},
        "fid": {"enabled": False},
    }
    path = work / "bench_sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--per_class", type=int, default=60, help="demo images per class (3 classes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run = tune.cpus_per_trial")
    args = p.parse_args()
    trials = [TRIALS[i % len(TRIALS)] for i in range(args.trials)]
    if len({tuple(t.items()) for t in trials}) < len(trials):
        trials = [{**t, "train.beta": 1.0 + 0.01 * i} for i, t in enumerate(trials)]  # distinct trials

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
        work = Path(tmp)
        run_vae.make_demo_dataset(work / "data", per_class=args.per_class)
        sweep = tune_vae.load_sweep(write_sweep(work, args, trials))
        run_vae.load_data(sweep["base"])  # decode once into the cache: neither side pays for it

        torch.set_num_threads(args.threads)
        plain, start = [], time.perf_counter()
        for i, params in enumerate(trials):
            cfg = tune_vae.trial_config(sweep["base"], params, work / "plain", f"plain{i}")
            plain.append(run_vae.train(cfg)["best"]["value"])
        plain_s = time.perf_counter() - start

        start = time.perf_counter()
        tune_vae.start_ray(num_cpus=args.threads, log_to_driver=False)
        ray_start_s = time.perf_counter() - start
        results, interrupted = tune_vae.run_sweep(sweep)
        sweep_s = time.perf_counter() - start
        import ray
        ray.shutdown()
        if interrupted:
            sys.exit("the sweep was interrupted")
        swept = {tuple(r.config[k] for k in trials[0]): r.metrics["best_val_neg_elbo"] for r in results}
        diff = max(abs(swept[tuple(t[k] for k in trials[0])] - v) for t, v in zip(trials, plain))

    print(f"\n{len(trials)} trials x {args.epochs} epochs, {3 * args.per_class} demo images at "
          f"{args.image_size}x{args.image_size}, {args.threads} torch threads, load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"plain run_vae.train back to back: {plain_s:7.1f} s")
    print(f"tune_vae sweep (Ray start {ray_start_s:.1f} s): {sweep_s:7.1f} s")
    print(f"ratio sweep / plain: {sweep_s / plain_s:.2f}  (overhead {sweep_s - plain_s:+.1f} s, "
          f"{(sweep_s - plain_s) / len(trials):+.1f} s per trial)")
    print(f"same results: max |best val_neg_elbo difference| = {diff:.3g}" + ("" if math.isfinite(diff) else " (!)"))


if __name__ == "__main__":
    main()
