"""
Reproduce the quality measurements of the README in one command: train for a fixed budget, then score
prior samples against a fixed, seeded set of real training images with every metric: FID (TF-Inception)
and KID, FD_eff (EfficientNet-Lite0 features, a space no loss trains against), precision / recall /
density / coverage in that space, and for a CVAE the accuracy of a linear classifier of real images on
held-out real images and on the samples (against the class each was drawn for).

    python bench/quality.py                                  # protocol apples: 10 epochs, 2000 vs 2000
    python bench/quality.py --protocol impressionism         # all 10,478 paintings at 64x64, 10 epochs, 2000 vs 2000
    python bench/quality.py --protocol impressionism --num-samples 10000 --num-real 10000   # larger N
    python bench/quality.py --protocol demo                  # generated demo fruit: no download
    python bench/quality.py --variants plain,perceptual,adversarial,both,soft_intro   # the loss recipes side by side
    python bench/quality.py --variants default,naive         # also the seed architecture trained naively
    python bench/quality.py train.beta=0.25 --json           # any run_vae override; last line is JSON
    python bench/quality.py --checkpoint logs/quality/<run>/last.pt    # score a finished run, no training
    python bench/quality.py --checkpoint logs/quality/<run>/last.pt --num-samples 1000 --recon  # + reconstructions
    python bench/quality.py --standard-prior                 # + the same noise through N(0, I): samples_standard.png
    python bench/quality.py --checkpoint <run>/last.pt --temperatures 0.7,0.5   # + the prior's spread scaled down, samples_t0.7.png, ...
    python bench/quality.py --checkpoint <run>/last.pt --prior-components 10   # + a mixture prior, samples_k10.png
    python bench/quality.py --checkpoint <run>/last.pt --label-scales 2   # + a CVAE's label extrapolated, samples_labels2.png

A protocol fixes the config, data, epochs and N of one data set; --config, --data, --epochs, --num-samples
and --num-real change single parts of it. Data folders default to ../shared/data/<name> beside the repo.
Numbers at different N do not compare: FID and FD read higher at small N, and the k-NN balls of precision
and recall shrink as N grows. Real features are cached under .cache/, so only the first run pays for them;
the 90 % train split is fixed by run.seed.
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

PROTOCOLS = {
    "apples": {"config": REPO / "config" / "train_apples.yaml", "data": SHARED_DATA / "apples",
               "epochs": 10, "num_samples": 2000, "num_real": 2000},
    "impressionism": {"config": REPO / "config" / "train_impressionism.yaml", "data": SHARED_DATA / "impressionism",
                      "epochs": 10, "num_samples": 2000, "num_real": 2000},
    "demo": {"config": REPO / "config" / "train_demo.yaml", "data": REPO / "data_demo",
             "epochs": 12, "num_samples": 500, "num_real": 500},
}

# "naive": the seed architecture trained the way most repos do it (summed MSE, beta 1, Adam 1e-3, no
# schedules); "plain", "perceptual", "adversarial", "both", "soft_intro": the loss recipes of run_vae.LOSS_RECIPES
VARIANTS = {
    "default": [],
    "naive": ["train.batch_size=64", "train.lr=1e-3", "train.lr_schedule=constant", "train.beta=1.0",
              "train.beta_warmup=0", "train.beta_cycle=0", "train.ema=0.0", "data.hflip=false",
              "train.grad_clip=0.0", "train.lr_warmup=0.0", "train.precision=fp32"],
    **{name: [f"loss.{k}={v}" for k, v in terms.items()] for name, terms in run_vae.LOSS_RECIPES.items()},
}

# what the table shows: (row key, heading, width, number format); a metric a run lacks prints as "-"
COLUMNS = [("fid", "FID", 8, ".2f"), ("fd_eff", "FD_eff", 8, ".2f"), ("kid", "KID", 7, ".4f"),
           ("precision", "prec", 6, ".3f"), ("recall", "recall", 6, ".3f"), ("density", "dens", 6, ".3f"),
           ("coverage", "cover", 6, ".3f"), ("class_acc_real", "cls real", 8, ".3f"),
           ("class_acc_gen", "cls gen", 7, ".3f"), ("num_generated", "N gen", 6, "d"), ("num_real", "N real", 6, "d"),
           ("epochs", "epochs", 6, "d"), ("train_s", "train s", 8, ".1f"), ("score_s", "score s", 7, ".1f")]
# scores of the same weights another way, printed after the row: (row key, label, number format)
EXTRAS = [("recon_fid", "reconstructions: FID", ".2f"), ("standard_prior_fid", "N(0, I) prior: FID", ".2f"),
          ("standard_prior_fd_eff", "FD_eff", ".2f"), ("standard_prior_class_acc_gen", "class acc.", ".3f")]
TEMPERED = ("fid", "fd_eff", "precision", "recall", "class_acc_gen")  # what each rescoring of the weights reports
SCORES = ("fid", "kid", "kid_std", "fd_eff", "precision", "recall", "density", "coverage", "pr_num",
          "class_acc_real", "class_acc_gen")


def measure(config, data_root, overrides, epochs, num_samples, num_real, name, out_dir, checkpoint=None,
            recon=False, standard_prior=False, temperatures=(), prior_components=(), label_scales=()):
    # the published rows were scored with Inception in fp32: a protocol stays there unless overridden
    overrides = [f"data.root={data_root}", f"train.epochs={epochs}", "fid.enabled=false", "fid.precision=fp32",
                 f"run.name={name}", f"run.log_dir={out_dir}", f"run.best_dir={out_dir}/best",
                 "data.val_fraction=0.1", "data.demo=false"] + overrides
    cfg = run_vae.load_config(config, overrides)
    t0 = time.time()
    finished_run = checkpoint is not None
    if not finished_run:
        check_label_scales(label_scales, cfg["model"]["conditional"])  # before hours of training
        summary = run_vae.train(cfg)
        checkpoint = Path(summary["run_dir"]) / "last.pt"  # the final weights (EMA if on)
    train_s = time.time() - t0
    ckpt = run_vae.load_checkpoint(checkpoint)
    if finished_run:  # a finished run was given: its own config decides the model and the split
        cache_dir, fid_cfg = cfg["data"]["cache_dir"], cfg["fid"]
        cfg = run_vae.merge_config(run_vae.DEFAULTS, ckpt["config"], str(checkpoint))
        cfg["data"]["root"], cfg["data"]["cache_dir"] = data_root, cache_dir
        cfg["fid"].update(efficientnet=fid_cfg["efficientnet"], precision=fid_cfg["precision"])
    epochs = ckpt["epoch"]
    model = run_vae.model_from_checkpoint(ckpt, run_vae.pick_device(cfg["run"]["device"]))
    check_label_scales(label_scales, model.num_classes > 0)  # before minutes of scoring
    cfg["fid"].update(enabled=True, num_samples=num_samples, real_max=num_real, real_split="train")
    data, train_idx, val_idx = run_vae.load_data(cfg)
    t0 = time.time()
    scorer = run_vae.FIDScorer(cfg, data, train_idx, val_idx, model.fc_mu.weight.device)
    scores = scorer.score(model, with_kid=True)
    score_s = time.time() - t0
    row = {"variant": name, **{k: scores[k] for k in SCORES if k in scores},
           "num_generated": num_samples, "num_real": scorer.num_real, "epochs": epochs,
           "train_s": round(train_s, 1), "score_s": round(score_s, 1),
           "val_bits_per_dim": ckpt["metrics"].get("val_bits_per_dim"), **scorer.describe(),
           "prior": run_vae.prior_description(ckpt)}
    row["extractor"] = row["fid_extractor"]
    rescore(row, ckpt, model, scorer, data, train_idx, Path(checkpoint), recon=recon, standard_prior=standard_prior,
            temperatures=temperatures, prior_components=prior_components, label_scales=label_scales)
    return row


def rescore(row, ckpt, model, scorer, data, train_idx, checkpoint, recon, standard_prior, temperatures,
            prior_components, label_scales):
    """Add to `row` the scores of the same weights sampled other ways, and save every grid beside `checkpoint`."""
    seed = scorer.cfg["run"]["seed"]
    if recon:
        row["recon_fid"] = reconstruction_fid(scorer, model, data, train_idx, scorer.cfg["fid"]["num_samples"], seed)

    def grid(file, temperature=1.0, sampler=model):  # every grid of one run: the same seeded noise
        return save_samples(sampler, data.classes, seed, checkpoint.with_name(file), temperature)

    def score_label_scales(suffix=""):  # the same noise, the label extrapolated, under the prior in use now
        for scale in label_scales:
            sampler = with_extrapolated_labels(model, scale)
            row[f"labels_{scale:g}{suffix}"] = {k: v for k, v in scorer.score(sampler).items() if k in TEMPERED}
            row[f"samples_labels{scale:g}{suffix}"] = grid(f"samples_labels{scale:g}{suffix}.png", sampler=sampler)

    if standard_prior:  # the same noise decoded through N(0, I): what the fitted prior adds
        fitted = model.prior_state()
        model.reset_prior()
        standard = scorer.score(model)
        row.update({f"standard_prior_{k}": standard[k] for k in TEMPERED if k in standard})
        row["samples_standard"] = grid("samples_standard.png")
        score_label_scales("_standard")
        model.load_prior(fitted)
    row["samples"] = grid("samples.png")
    score_label_scales()
    for t in temperatures:  # the same noise scaled by t: what a narrower prior trades between the metrics
        row[f"temperature_{t:g}"] = {k: v for k, v in scorer.score(model, temperature=t).items() if k in TEMPERED}
        row[f"samples_t{t:g}"] = grid(f"samples_t{t:g}.png", t)
    device = model.fc_mu.weight.device
    posteriors = run_vae.encode_posteriors(model, data.subset(train_idx), device, keep_codes=True) \
        if prior_components else None  # one encoding of the training images serves every m
    for m in prior_components:  # the same weights, the prior refitted as a mixture of m Gaussians per class
        mixture = run_vae.with_prior_components(ckpt, m, None, device, posteriors=posteriors)
        row[f"components_{m}"] = {k: v for k, v in scorer.score(mixture).items() if k in TEMPERED}
        row[f"samples_k{m}"] = grid(f"samples_k{m}.png", sampler=mixture)


def check_label_scales(label_scales, conditional):
    """--label-scales changes the label a CVAE's decoder is given: a model without labels is refused."""
    if label_scales and not conditional:
        raise run_vae.ConfigError("--label-scales needs a conditional model (model.conditional: true)")


def with_extrapolated_labels(model, scale):
    """The CVAE `model` with its decoder given each label pushed away from the classes' average by `scale`:
    1/K + scale (one-hot - 1/K). Scale 1 is the label as trained; above 1 exaggerates what sets the classes
    apart, as classifier-free guidance does with its two predictions. The prior still picks z by the class
    itself. A sampling probe, not a training option: on the paintings it lost (docs/results.md "Sharp samples")."""
    sampler = copy.copy(model)  # shares the weights and the prior buffers; only its decode differs
    k = model.num_classes

    def decode_extrapolated(z, y):
        return model.decode(z, 1.0 / k + scale * (model.one_hot(y) - 1.0 / k))

    sampler.decode = decode_extrapolated  # sample(), sample_grid() and the scorer all decode through it
    return sampler


def save_samples(model, classes, seed, path, temperature=1.0):
    """The 8-per-class grid of seeded prior samples (the same noise at every temperature) as a PNG; its path."""
    images, nrow, labels = run_vae.sample_grid(model, classes, 8, seed, temperature)
    run_vae.make_grid_image(images, nrow, labels).save(path)
    return str(path)


@torch.no_grad()
def reconstruction_fid(scorer, model, data, train_idx, n, seed):
    """FID of the decoder's reconstructions (posterior means) of n seeded training images against the
    same real statistics: what the decoder reaches when z comes from the encoder instead of the prior,
    so the gap to the prior samples' FID is what the prior costs."""
    pick = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:n]]
    images = data.subset(pick)
    fake = run_vae.to_uint8(run_vae.reconstructions(model, images.images, images.labels, scorer.batch_size)).cpu()
    return run_vae.fid_from_features(scorer.real_features, scorer.extract(fake))


def format_table(rows):
    """One line per variant with every metric; what a row lacks (class accuracy of a plain VAE) is '-'."""
    lines = [" ".join([f"{'variant':<10}"] + [f"{heading:>{width}}" for _, heading, width, _ in COLUMNS])]
    for r in rows:
        cells = [f"{r['variant']:<10}"] + [f"{r[key]:{width}{fmt}}" if r.get(key) is not None else f"{'-':>{width}}"
                                           for key, _, width, fmt in COLUMNS]
        extras = [f"{label} {r[key]:{fmt}}" for key, label, fmt in EXTRAS if key in r]
        lines.append(" ".join(cells) + ("   " + ", ".join(extras) if extras else ""))
        for key in (k for k in r if k.startswith(("temperature_", "components_", "labels_"))):
            scores = ", ".join(f"{name} {r[key][name]:.3f}" for name in TEMPERED if name in r[key])
            lines.append(f"{'':<10} {describe_rescoring(key)}: {scores}")
    return "\n".join(lines)


def describe_rescoring(key):
    """How a row's rescoring of the same weights (temperature_0.7, components_10, labels_2_standard) sampled."""
    kind, value = key.split("_", 1)
    if kind == "temperature":
        return f"at temperature {value}"
    if kind == "components":
        return f"with {value} Gaussians per class"
    scale, _, standard = value.partition("_")
    return f"labels extrapolated x{scale}" + (" from N(0, I)" if standard else "")


def resolve_data(protocol, data):
    """The protocol's data folder (or --data), with a message saying how to get it when it is missing."""
    root = Path(data) if data else PROTOCOLS[protocol]["data"]
    if protocol == "demo" and data is None:
        run_vae.make_demo_dataset(root)
    if not root.is_dir():
        sys.exit(f"data folder {root} does not exist. Build it with prepare_data.py (README 'Data'), point "
                 f"--data at it, or use --protocol demo (generated, no download).")
    return str(root)


def parse_numbers(text, flag, cast, setting, example):
    """A comma-separated flag's values, each cast and inside the range of the run_vae setting it stands for."""
    try:
        values = [cast(t) for t in text.split(",") if t.strip()]
    except ValueError:
        kind = "whole numbers" if cast is int else "numbers"
        sys.exit(f"{flag} takes {kind} separated by commas, e.g. {example} (got {text!r})")
    low, high, low_allowed = run_vae.RANGES[setting]
    if not all(run_vae.in_range(v, low, high, low_allowed) for v in values):
        sys.exit(f"{flag} must each be {run_vae.describe_range(low, high, low_allowed)} (got {text!r})")
    return values


def parse_temperatures(text):
    """--temperatures as floats, each in test.temperature's range (0 would decode the class means alone, N times)."""
    return parse_numbers(text, "--temperatures", float, "test.temperature", "0.7,0.5")


def parse_label_scales(text):
    """--label-scales as floats, each in test.temperature's range (0 would give every class the same label)."""
    return parse_numbers(text, "--label-scales", float, "test.temperature", "1.5,2")


def parse_components(text):
    """--prior-components as whole numbers, each in model.prior_components' range."""
    return parse_numbers(text, "--prior-components", int, "model.prior_components", "5,10")


def run_stamp():
    """The run-name suffix: the start time to the second, then the process id, so that two benches started in
    the same second (two cores, two recipes) write to different run folders instead of meeting the run lock."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="apples", choices=list(PROTOCOLS))
    p.add_argument("--config", default=None, help="training config (default: the protocol's)")
    p.add_argument("--data", default=None, help="image folder (default: the protocol's, ../shared/data/<name>)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None, help="generated images scored")
    p.add_argument("--num-real", type=int, default=None, help="real training images scored against (at most)")
    p.add_argument("--variants", default="default", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(REPO / "logs" / "quality"))
    p.add_argument("--checkpoint", default=None, help="score this finished run's checkpoint instead of training")
    p.add_argument("--recon", action="store_true",
                   help="also score reconstructions of --num-samples training images (the decoder without the prior)")
    p.add_argument("--standard-prior", action="store_true",
                   help="also score samples from N(0, I) instead of the model's fitted prior "
                        "(their grid: samples_standard.png)")
    p.add_argument("--temperatures", default="",
                   help="comma-separated: also score the same noise with the prior's spread scaled by each")
    p.add_argument("--prior-components", default="",
                   help="comma-separated: also score the same weights with the prior refitted as a mixture of "
                        "each many Gaussians per class (model.prior_components)")
    p.add_argument("--label-scales", default="",
                   help="comma-separated: also score the same noise with a CVAE decoder's label extrapolated by each "
                        "(1/K + s (one-hot - 1/K)); with --standard-prior from N(0, I) too")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = p.parse_args()
    protocol = {**PROTOCOLS[args.protocol],
                **{k: v for k, v in [("config", args.config), ("epochs", args.epochs),
                                     ("num_samples", args.num_samples), ("num_real", args.num_real)] if v is not None}}
    data_root = resolve_data(args.protocol, args.data)
    temperatures = parse_temperatures(args.temperatures)
    components = parse_components(args.prior_components)
    label_scales = parse_label_scales(args.label_scales)
    stamp = run_stamp()
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    try:
        for variant in args.variants.split(","):
            rows.append(measure(str(protocol["config"]), data_root, VARIANTS[variant] + args.overrides,
                                protocol["epochs"], protocol["num_samples"], protocol["num_real"],
                                f"{variant}-{stamp}", args.out, args.checkpoint, args.recon, args.standard_prior,
                                temperatures, components, label_scales))
            rows[-1].update(variant=variant, protocol=args.protocol)
    except run_vae.StopRequested as e:
        # a shortened run's figures do not compare with the protocol's, so the bench does not score it itself
        print(f"{e}\nthe bench stopped before scoring; to score the weights as they are: python bench/quality.py "
              f"--protocol {args.protocol} --checkpoint <that last.pt>", file=sys.stderr)
        sys.exit(130)
    except (run_vae.ConfigError, run_vae.DataError, run_vae.CheckpointError, run_vae.TrainingDiverged) as e:
        sys.exit(f"error: {e}")
    print(f"\nprotocol: {args.protocol}   data: {data_root}   config: {protocol['config']}   "
          f"overrides: {' '.join(args.overrides) or '-'}")
    print(format_table(rows))
    first = rows[0]
    if first["num_real"] < protocol["num_real"]:
        print(f"note: the train split has only {first['num_real']} images, so N real = {first['num_real']} "
              f"(asked for {protocol['num_real']})")
    if "pr_num" in first:
        print(f"precision/recall/density/coverage: k = {first['pr_k']} neighbours, both sets at N = {first['pr_num']}; "
              f"FD_eff in {first['fd_eff_extractor']}. Numbers at different N do not compare.")
    if args.json:
        print(json.dumps(first if len(rows) == 1 else {**first, "variants": rows}))


if __name__ == "__main__":
    main()
