"""How near a run's prior samples lie to the training images: for each image, the pixel distance (L2 over
all values in [0, 1]) to its nearest training image, as the 10th, 50th and 90th percentiles. Held-out real
images and reconstructions of training images (blurred copies by construction) give the scale; a prior
whose samples come as near as the reconstructions draws copies, whatever its FID.

    python bench/nearest_train.py --checkpoint logs/quality/<run>/last.pt --data ../shared/data/apples
    python bench/nearest_train.py --checkpoint <run>/last.pt --data <folder> --prior-components 10,30 -n 600
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import run_vae  # noqa: E402


def nearest_distances(images, train):
    """Each uint8 image's L2 pixel distance (values in [0, 1]) to its nearest uint8 training image."""
    flat = lambda u8: u8.reshape(len(u8), -1).float() / 255
    reference = flat(train)
    return torch.cat([torch.cdist(flat(chunk), reference).min(1).values for chunk in images.split(100)])


def percentiles(d):
    return dict(zip(("p10", "median", "p90"), torch.quantile(d, torch.tensor([0.1, 0.5, 0.9])).tolist()))


@torch.no_grad()
def probe(checkpoint, data_root, components=(), n=600, seed=0):
    """{what: percentiles} for held-out real images, reconstructions and samples of each prior (1 = the run's)."""
    ckpt = run_vae.load_checkpoint(checkpoint)
    cfg = run_vae.merge_config(run_vae.DEFAULTS, ckpt["config"], str(checkpoint))
    cfg["data"]["root"] = data_root
    data, train_idx, val_idx = run_vae.load_data(cfg)
    train, held_out = data.subset(train_idx), data.subset(val_idx)
    model = run_vae.model_from_checkpoint(ckpt)
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:n]
    y = train.labels[pick] if model.num_classes else None
    rows = {"held-out real": held_out.images[:n],
            "reconstructions": run_vae.to_uint8(model.reconstruct(run_vae.to_float(train.images[pick]), y))}
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    posteriors = run_vae.encode_posteriors(model, train, "cpu", keep_codes=True) if components else None
    for k in (1, *components):
        sampler = run_vae.with_prior_components(ckpt, k, None, "cpu", posteriors=posteriors) if k > 1 else model
        with run_vae.fixed_noise(seed):
            rows[f"samples, {k} per class"] = run_vae.to_uint8(sampler.sample(
                n, labels, generator=torch.Generator().manual_seed(seed),
                pick_generator=torch.Generator().manual_seed(seed + 1)))
    return {what: percentiles(nearest_distances(images, train.images)) for what, images in rows.items() if len(images)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the image folder the run trained on")
    p.add_argument("--prior-components", default="", help="comma-separated: also refit the prior as mixtures")
    p.add_argument("-n", type=int, default=600, help="images of each kind")
    args = p.parse_args()
    components = quality.parse_components(args.prior_components)
    for what, q in probe(args.checkpoint, args.data, components, args.n).items():
        print(f"{what:<24} nearest-train L2: p10 {q['p10']:.2f}  median {q['median']:.2f}  p90 {q['p90']:.2f}")


if __name__ == "__main__":
    main()
