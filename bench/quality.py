"""
Reproduce the quality measurement of the README in one command: train for a fixed budget, then score
FID (and KID) of prior samples against a fixed, seeded set of real images with TF-Inception features.

    python bench/quality.py                                  # default apple config, 10 epochs, 2000 vs 2000
    python bench/quality.py --variants default,plain         # also the seed architecture trained plainly
    python bench/quality.py --config config/train_impressionism.yaml --data ../shared/data/impressionism_sample
    python bench/quality.py train.beta=0.5 --json            # any run_vae override; last line is JSON
    python bench/quality.py --checkpoint logs/quality/<run>/last.pt --num-samples 2000   # score a finished run
    python bench/quality.py --checkpoint logs/quality/<run>/last.pt --num-samples 1000 --recon  # + reconstructions
    python bench/quality.py --standard-prior                 # + the same noise through N(0, I), not the fitted prior

Data: ../shared/data/apples when present, else the generated demo fruit. Real statistics are cached
under .cache/, so only the first run pays for them. The 90% train split is fixed by run.seed.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_APPLES = REPO.parent / "shared" / "data" / "apples"

# "plain": the seed architecture trained the way most repos do it (summed MSE, beta 1, Adam 1e-3, no schedules)
VARIANTS = {
    "default": [],
    "plain": ["train.batch_size=64", "train.lr=1e-3", "train.lr_schedule=constant", "train.beta=1.0",
              "train.beta_warmup=0", "train.beta_cycle=0", "train.ema=0.0", "data.hflip=false",
              "train.grad_clip=0.0", "train.lr_warmup=0.0", "train.precision=fp32"],
}


def measure(config, data_root, overrides, epochs, num_samples, num_real, name, out_dir, checkpoint=None,
            recon=False, standard_prior=False):
    overrides = [f"data.root={data_root}", f"train.epochs={epochs}", "fid.enabled=false",
                 f"run.name={name}", f"run.log_dir={out_dir}", f"run.best_dir={out_dir}/best",
                 "data.val_fraction=0.1", "data.demo=false"] + overrides
    cfg = run_vae.load_config(config, overrides)
    t0 = time.time()
    finished_run = checkpoint is not None
    if not finished_run:
        summary = run_vae.train(cfg)
        checkpoint = Path(summary["run_dir"]) / "last.pt"  # the final weights (EMA if on)
    train_s = time.time() - t0
    ckpt = run_vae.load_checkpoint(checkpoint)
    if finished_run:  # a finished run was given: its own config decides the model and the split
        cache_dir = cfg["data"]["cache_dir"]
        cfg = run_vae.merge_config(run_vae.DEFAULTS, ckpt["config"], str(checkpoint))
        cfg["data"]["root"], cfg["data"]["cache_dir"] = data_root, cache_dir
    epochs = ckpt["epoch"]
    model = run_vae.model_from_checkpoint(ckpt, run_vae.pick_device(cfg["run"]["device"]))
    cfg["fid"].update(enabled=True, num_samples=num_samples, real_max=num_real, real_split="train")
    data, train_idx, val_idx = run_vae.load_data(cfg)
    t0 = time.time()
    scorer = run_vae.FIDScorer(cfg, data, train_idx, val_idx, model.fc_mu.weight.device)
    scores = scorer.score(model, with_kid=True)
    fid_s = time.time() - t0
    recon_fid = reconstruction_fid(scorer, model, data, train_idx, num_samples, cfg["run"]["seed"]) if recon else None
    standard_fid = None
    if standard_prior:  # the same noise decoded through N(0, I): what the fitted prior adds
        fitted = model.prior_mean.clone(), model.prior_scale_tril.clone()
        model.reset_prior()
        standard_fid = scorer.score(model)["fid"]
        model.set_prior(*fitted)
    out = Path(checkpoint).with_name("samples.png")
    images, nrow, labels = run_vae.sample_grid(model, data.classes, 8, cfg["run"]["seed"])
    run_vae.make_grid_image(images, nrow, labels).save(out)
    return {"variant": name, "fid": scores["fid"], "kid": scores["kid"], "kid_std": scores["kid_std"],
            "num_generated": num_samples, "num_real": scorer.num_real, "epochs": epochs,
            "train_s": round(train_s, 1), "fid_s": round(fid_s, 1),
            "val_bits_per_dim": ckpt["metrics"].get("val_bits_per_dim"),
            "extractor": scorer.extractor_name, "samples": str(out),
            "prior": run_vae.prior_description(ckpt),
            **({"recon_fid": recon_fid} if recon else {}),
            **({"standard_prior_fid": standard_fid} if standard_prior else {})}


@torch.no_grad()
def reconstruction_fid(scorer, model, data, train_idx, n, seed):
    """FID of the decoder's reconstructions (posterior means) of n seeded training images against the
    same real statistics: what the decoder reaches when z comes from the encoder instead of the prior,
    so the gap to the prior samples' FID is what the prior costs."""
    pick = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:n]]
    images, device, out = data.subset(pick), model.fc_mu.weight.device, []
    for i in range(0, len(images), scorer.batch_size):
        x = run_vae.to_float(images.images[i:i + scorer.batch_size]).to(device)
        y = images.labels[i:i + scorer.batch_size].to(device) if model.num_classes else None
        out.append(run_vae.to_uint8(model.reconstruct(x, y)).cpu())
    return run_vae.fid_from_features(scorer.real_features, scorer.extract(torch.cat(out)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "config" / "train_apples.yaml"))
    p.add_argument("--data", default=None, help="image folder (default: ../shared/data/apples, else demo fruit)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--num-real", type=int, default=2000)
    p.add_argument("--variants", default="default", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(REPO / "logs" / "quality"))
    p.add_argument("--checkpoint", default=None, help="score this finished run's checkpoint instead of training")
    p.add_argument("--recon", action="store_true",
                   help="also score reconstructions of --num-samples training images (the decoder without the prior)")
    p.add_argument("--standard-prior", action="store_true",
                   help="also score samples from N(0, I) instead of the model's fitted prior")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = p.parse_args()
    data_root = args.data
    if data_root is None:
        data_root = str(SHARED_APPLES) if SHARED_APPLES.is_dir() else str(REPO / "data_demo")
        if not SHARED_APPLES.is_dir():
            run_vae.make_demo_dataset(data_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        rows.append(measure(args.config, data_root, VARIANTS[variant] + args.overrides, args.epochs,
                            args.num_samples, args.num_real, f"{variant}-{stamp}", args.out, args.checkpoint,
                            args.recon, args.standard_prior))
        rows[-1]["variant"] = variant
    print(f"\ndata: {data_root}   config: {args.config}   overrides: {' '.join(args.overrides) or '-'}")
    print(f"{'variant':<10} {'FID':>8} {'KID':>9} {'N gen':>6} {'N real':>7} {'epochs':>6} {'train s':>8} {'FID s':>6}")
    for r in rows:
        print(f"{r['variant']:<10} {r['fid']:8.2f} {r['kid']:9.4f} {r['num_generated']:6d} {r['num_real']:7d} "
              f"{r['epochs']:6d} {r['train_s']:8.1f} {r['fid_s']:6.1f}"
              + (f"   reconstructions: FID {r['recon_fid']:.2f}" if "recon_fid" in r else "")
              + (f"   N(0, I) prior: FID {r['standard_prior_fid']:.2f}" if "standard_prior_fid" in r else ""))
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else {**rows[0], "variants": rows}))


if __name__ == "__main__":
    main()
