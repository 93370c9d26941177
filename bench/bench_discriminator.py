"""
Can the adversarial term's discriminator tell a trained VAE's reconstructions from real images? This trains
the patch discriminator alone (run_vae.SharpTerms: hinge loss, spectral norm, DiffAugment, its own Adam) on
real images against the checkpoint's reconstructions, with the loss settings given, and prints its hinge
loss and accuracy on held-out images every --every steps. A discriminator that stays at loss 1.0 and
accuracy 0.5 gives the decoder no signal: the adversarial term then does nothing, whatever its weight.

    python bench/bench_discriminator.py --checkpoint logs/quality/<run>/last.pt --data ../shared/data/apples
    python bench/bench_discriminator.py --checkpoint ... --data ... --diffaug color,translation,cutout --disc_lr 2e-4
    python bench/bench_discriminator.py --checkpoint ... --data ... --batch_size 16 --steps 3000 --json

Accuracy: the share of held-out real images whose mean logit is above 0 and of reconstructions whose mean
logit is below 0, averaged (0.5 = chance), measured without augmentation.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_vae  # noqa: E402


def held_out_scores(disc, real, fake):
    """(hinge loss, accuracy) of the discriminator's mean logit per image, without augmentation."""
    with torch.no_grad():
        r, f = disc(real).mean((1, 2, 3)), disc(fake).mean((1, 2, 3))
    accuracy = ((r > 0).float().mean() + (f < 0).float().mean()) / 2
    return run_vae.hinge_d_loss(r, f).item(), accuracy.item()


def load_pairs(args, ckpt, model):
    """Real images and their reconstructions, floats in [0,1]: (real, fake, held-out real, held-out fake)."""
    data = run_vae.load_image_folder(args.data, model.image_size, cache_dir=args.cache_dir)
    if model.num_classes and list(data.classes) != list(ckpt["classes"]):
        raise run_vae.DataError(f"{args.data} has classes {list(data.classes)}, the checkpoint "
                                f"{list(ckpt['classes'])}: point --data at the images the model was trained on")
    g = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data.labels), generator=g)[:args.images + args.held_out]
    if len(index) < args.held_out + args.batch_size:
        raise run_vae.DataError(f"{args.data} has {len(data.labels)} images: too few for --held_out {args.held_out} "
                                f"and --batch_size {args.batch_size}")
    images, labels = data.images[index], torch.as_tensor(data.labels)[index]  # a tensor, also from a memory map
    fake, real = run_vae.reconstructions(model, images, labels), run_vae.to_float(images)
    n = len(real) - args.held_out
    return real[:n], fake[:n], real[n:], fake[n:]


def run(args):
    torch.manual_seed(args.seed)
    ckpt = run_vae.load_checkpoint(args.checkpoint)
    model = run_vae.model_from_checkpoint(ckpt)
    real, fake, real_out, fake_out = load_pairs(args, ckpt, model)
    loss = {"adversarial": 1.0, "adv_start": 0.0, "diffaug": args.diffaug, "disc_lr": args.disc_lr,
            "disc_channels": args.disc_channels, "disc_antialias": args.disc_antialias}
    cfg = run_vae.load_config(None, {"data": {"image_size": model.image_size}, "loss": loss})
    sharp = run_vae.SharpTerms(cfg, "cpu", steps_per_epoch=1)
    report, start = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            held_loss, accuracy = held_out_scores(sharp.disc, real_out, fake_out)
            report.append({"step": step, "loss": held_loss, "accuracy": accuracy})
            print(f"step {step:5d}  held-out hinge loss {held_loss:.3f}  accuracy {accuracy:.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr if args.json else sys.stdout, flush=True)
        if step < args.steps:
            batch = torch.randint(0, len(real), (args.batch_size,))
            sharp.discriminator_step(real[batch], fake[batch], step)
    return {"settings": loss | {"batch_size": args.batch_size}, "report": report}


def main(argv=None):
    d = run_vae.DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's last.pt or best.pt")
    p.add_argument("--data", required=True, help="the class-per-folder images the model was trained on")
    p.add_argument("--cache_dir", default=d["data"]["cache_dir"])
    p.add_argument("--diffaug", default=d["loss"]["diffaug"])
    p.add_argument("--disc_lr", type=float, default=d["loss"]["disc_lr"])
    p.add_argument("--disc_channels", type=int, default=d["loss"]["disc_channels"])
    p.add_argument("--disc_antialias", action=argparse.BooleanOptionalAction, default=d["loss"]["disc_antialias"])
    p.add_argument("--batch_size", type=int, default=d["train"]["batch_size"])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=500, help="steps between held-out scores")
    p.add_argument("--images", type=int, default=2000, help="real images (and reconstructions) to train on")
    p.add_argument("--held_out", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="the report as one JSON object on the last line")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except (run_vae.ConfigError, run_vae.DataError, run_vae.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
