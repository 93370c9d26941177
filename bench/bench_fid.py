"""
What periodic FID costs at the default apple config: one evaluation (cached real features) as a
fraction of one training epoch and of the whole run, and Inception images/s.

    python bench/bench_fid.py                 # ../shared/data/apples when present, else the demo fruit
    python bench/bench_fid.py --json          # last line: one JSON object
    python bench/bench_fid.py --quick         # 100 samples: a minute or two

The epoch and the evaluation are timed in the same process, one after the other, so the ratio holds
even when the machine's absolute speed drifts.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_vae  # noqa: E402

SHARED_APPLES = ROOT.parent / "shared" / "data" / "apples"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "config" / "train_apples.yaml"))
    p.add_argument("--data", default=None)
    p.add_argument("--quick", action="store_true", help="score 100 samples instead of the config's number")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    data_root = args.data or (str(SHARED_APPLES) if SHARED_APPLES.is_dir() else str(ROOT / "data_demo"))
    if not Path(data_root).is_dir():
        run_vae.make_demo_dataset(data_root)
    tmp = Path(tempfile.mkdtemp(prefix="bench_fid_"))
    try:
        cfg = run_vae.load_config(args.config, [f"data.root={data_root}", f"run.log_dir={tmp}/logs",
                                                f"run.best_dir={tmp}/best", "train.epochs=1", "fid.enabled=false",
                                                "run.name=bench"])
        device = run_vae.pick_device(cfg["run"]["device"])
        shipped = run_vae.load_config(args.config)["fid"]  # the config's own FID budget ('auto' resolved)
        fid_cfg = run_vae.resolve_fid_auto(shipped, device)
        if args.quick:
            fid_cfg["num_samples"] = 100
        data, train_idx, val_idx = run_vae.load_data(cfg)  # decoded once here, so the epoch below is pure training
        t0 = time.time()
        run_vae.train(cfg)
        epoch_s = time.time() - t0

        cfg["fid"].update(fid_cfg, enabled=True)
        net = run_vae.load_fid_network(cfg["fid"]["weights"], device)
        scorer = run_vae.FIDScorer(cfg, data, train_idx, val_idx, device, net)  # real features: cached after this
        model = run_vae.model_from_checkpoint(run_vae.load_checkpoint(Path(tmp) / "logs" / "bench" / "last.pt"), device)
        t0 = time.time()
        scorer.score(model)
        fid_s = time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    full_epoch_s = epoch_s
    epochs, every = run_vae.load_config(args.config)["train"]["epochs"], fid_cfg["every"]
    evaluations = len({e for e in range(1, epochs + 1) if e % every == 0 or e == epochs})
    share = evaluations * fid_s / (epochs * full_epoch_s + evaluations * fid_s)
    result = {"data": data_root, "epoch_s": round(full_epoch_s, 1), "fid_eval_s": round(fid_s, 1),
              "fid_per_epoch": round(fid_s / full_epoch_s, 3), "fid_share_of_run": round(share, 3),
              "num_samples": fid_cfg["num_samples"], "every": every, "epochs": epochs,
              "inception_images_per_s": round(fid_cfg["num_samples"] / fid_s, 2),
              "threads": torch.get_num_threads()}
    print(f"data {data_root}: one epoch {full_epoch_s:.0f} s, one FID evaluation of {fid_cfg['num_samples']} "
          f"samples {fid_s:.0f} s ({result['inception_images_per_s']} images/s)")
    print(f"FID / epoch = {result['fid_per_epoch']:.2f}; with fid.every={every} over {epochs} epochs FID takes "
          f"{100 * share:.0f}% of the run (target: at most 25%)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
