"""
What periodic evaluation costs at the default apple config: one evaluation (cached real features) as a
fraction of one training epoch and of the whole run, and what each metric of it costs: sampling, the
Inception pass and FID, and the metrics beside it (the EfficientNet pass, FD_eff, precision / recall /
density / coverage, the class probe), which together should cost at most a quarter of the Inception pass.

    python bench/bench_fid.py                 # ../shared/data/apples when present, else the demo fruit
    python bench/bench_fid.py --json          # last line: one JSON object
    python bench/bench_fid.py --quick         # 100 samples: a minute or two

    # fid.precision: FID of the same samples with Inception in fp32 and in bf16 (each with its own real
    # statistics, as the switch would run it), the relative change and both speeds
    python bench/bench_fid.py --compare-precision --checkpoint logs/quality/<run>/last.pt --data ../shared/data/apples

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
NEW_METRICS = ("efficientnet", "fd_eff", "prdc", "class_probe")  # what the second feature space adds


def evaluation_cost(args, data_root):
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
        scorer = run_vae.FIDScorer(cfg, data, train_idx, val_idx, device)  # real features: cached after this
        model = run_vae.model_from_checkpoint(run_vae.load_checkpoint(Path(tmp) / "logs" / "bench" / "last.pt"), device)
        t0 = time.time()
        scores = scorer.score(model)
        eval_s = time.time() - t0
        parts = dict(scorer.timings)
        probe_fit_s = None
        if scorer.probe is not None:  # once a run, when the scorer is built; timed again here on the same features
            t0 = time.time()
            run_vae.fit_class_probe(scorer.second_real, data.labels[scorer.real_index])
            probe_fit_s = time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    epochs, every = run_vae.load_config(args.config)["train"]["epochs"], fid_cfg["every"]
    evaluations = len({e for e in range(1, epochs + 1) if e % every == 0 or e == epochs})
    share = evaluations * eval_s / (epochs * epoch_s + evaluations * eval_s)
    new_s = sum(parts.get(k, 0.0) for k in NEW_METRICS)
    n = fid_cfg["num_samples"]
    result = {"data": data_root, "epoch_s": round(epoch_s, 1), "fid_eval_s": round(eval_s, 1),
              "fid_per_epoch": round(eval_s / epoch_s, 3), "fid_share_of_run": round(share, 3),
              "num_samples": n, "every": every, "epochs": epochs,
              "inception_images_per_s": round(n / parts["inception"], 2),
              "parts_s": {k: round(v, 2) for k, v in parts.items()},
              "new_metrics_s": round(new_s, 2), "new_metrics_per_inception": round(new_s / parts["inception"], 3),
              "class_probe_fit_s": round(probe_fit_s, 2) if probe_fit_s is not None else None,
              "metrics": {k: round(float(v), 4) for k, v in scores.items()},
              "threads": torch.get_num_threads()}
    print(f"data {data_root}: one epoch {epoch_s:.0f} s, one evaluation of {n} samples {eval_s:.0f} s "
          f"(Inception {result['inception_images_per_s']} images/s)")
    print(f"evaluation / epoch = {result['fid_per_epoch']:.2f}; with fid.every={every} over {epochs} epochs "
          f"evaluation takes {100 * share:.0f}% of the run (target: at most 25%)")
    print("per evaluation, seconds:")
    for name, seconds in parts.items():
        print(f"  {name:<13} {seconds:7.2f}" + ("   (beside FID)" if name in NEW_METRICS else ""))
    print(f"metrics beside FID: {new_s:.1f} s = {result['new_metrics_per_inception']:.2f} of the Inception pass "
          f"(target: at most 0.25)" + (f"; the class probe's fit, once a run: {probe_fit_s:.1f} s"
                                       if probe_fit_s is not None else ""))
    return result


def compare_precision(args, data_root):
    """FID of one set of samples with Inception in fp32 and in bf16 (fid.precision), each against real
    statistics computed at its own precision, as a run with that setting would score it."""
    ckpt = run_vae.load_checkpoint(args.checkpoint)
    cache_dir = run_vae.load_config(None)["data"]["cache_dir"]
    cfg = run_vae.merge_config(run_vae.DEFAULTS, ckpt["config"], args.checkpoint)
    cfg["data"].update(root=str(Path(data_root).absolute()), cache_dir=cache_dir, demo=False)
    cfg["fid"].update(enabled=True, efficientnet=False, num_samples=args.num_samples, real_max=args.num_real,
                      real_split="train")
    device = run_vae.pick_device(args.device)
    model = run_vae.model_from_checkpoint(ckpt, device)
    data, train_idx, val_idx = run_vae.load_data(cfg)
    scorers = {p: run_vae.FIDScorer({**cfg, "fid": {**cfg["fid"], "precision": p}}, data, train_idx, val_idx, device)
               for p in ("fp32", "bf16")}
    images, labels = scorers["fp32"].generate(model, args.num_samples, cfg["run"]["seed"])
    result = {"checkpoint": args.checkpoint, "data": data_root, "num_generated": args.num_samples,
              "num_real": scorers["fp32"].num_real, "device": str(device)}
    for precision, scorer in scorers.items():
        scorer.timings.clear()
        result[f"fid_{precision}"] = scorer.score_images(images, labels)["fid"]
        result[f"images_per_s_{precision}"] = round(args.num_samples / scorer.timings["inception"], 2)
    result["relative_change"] = (result["fid_bf16"] - result["fid_fp32"]) / result["fid_fp32"]
    result["bf16_speedup"] = round(result["images_per_s_bf16"] / result["images_per_s_fp32"], 3)
    print(f"{args.checkpoint}: {args.num_samples} samples vs {result['num_real']} real images on {device}")
    print(f"FID fp32 {result['fid_fp32']:.3f} ({result['images_per_s_fp32']} images/s), "
          f"bf16 {result['fid_bf16']:.3f} ({result['images_per_s_bf16']} images/s)")
    print(f"relative change {100 * result['relative_change']:+.3f} %, bf16 speed-up {result['bf16_speedup']}x "
          f"(adopt bf16 only if the change is under 0.5 % and it is faster)")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "config" / "train_apples.yaml"))
    p.add_argument("--data", default=None)
    p.add_argument("--quick", action="store_true", help="score 100 samples instead of the config's number")
    p.add_argument("--compare-precision", action="store_true",
                   help="score --checkpoint's samples with Inception in fp32 and bf16 (needs --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a finished run's last.pt or best checkpoint")
    p.add_argument("--num-samples", type=int, default=2000, help="with --compare-precision")
    p.add_argument("--num-real", type=int, default=2000, help="with --compare-precision")
    p.add_argument("--device", default="auto", help="with --compare-precision: auto, cpu, cuda")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.compare_precision and not args.checkpoint:
        p.error("--compare-precision needs --checkpoint <run>/last.pt (and --data, the run's image folder)")
    data_root = args.data or (str(SHARED_APPLES) if SHARED_APPLES.is_dir() else str(ROOT / "data_demo"))
    if not Path(data_root).is_dir():
        if args.data:
            sys.exit(f"data folder {data_root} does not exist")
        run_vae.make_demo_dataset(data_root)
    try:
        result = compare_precision(args, data_root) if args.compare_precision else evaluation_cost(args, data_root)
    except (run_vae.ConfigError, run_vae.DataError, run_vae.CheckpointError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
