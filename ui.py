"""
A browser gallery for trained (C)VAE checkpoints: a sortable table of every checkpoint with its metrics,
samples of one model or of several side by side (same seed, class and temperature), reconstructions of
data images and of your own pictures, sliders along the principal axes of the fitted prior, interpolation
as a strip and an animated GIF, and downloads (PNG, GIF, a ZIP of the samples with a manifest).

    streamlit run ui.py                                      # every checkpoint under best_models/ and logs/*/
    streamlit run ui.py -- --checkpoint best_models/demo.pt  # open this one first (any path)
    streamlit run ui.py -- --best-dir runs/best --logs-dir runs/logs --cache-dir /tmp/ui-cache

No checkpoint yet? Train the demo model first: python run_vae.py --config config/train_demo.yaml
Checkpoints are read by run_vae.load_checkpoint (torch.load with weights_only=True), so opening a file can
never run code. The page's address holds the view (models, tab, seed, ...): copy it to share or reopen a view.
The only files the app writes are decoded data images, under --cache-dir. docs/ui.md has the details.
"""
import argparse
import base64
import hashlib
import io
import json
import math
import re
import sys
import zipfile
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st
import torch
from PIL import Image, ImageDraw, ImageFont

from run_vae import (DEFAULTS, IMAGE_EXTENSIONS, CheckpointError, DataError, config_to_yaml, decode_image,
                     load_checkpoint, load_image_folder, model_from_checkpoint, pick_device,
                     prior_description, shared_noise, split_train_val, to_float)

TRAIN_COMMAND = "python run_vae.py --config config/train_demo.yaml"
UI_CACHE_DIR = str(Path(DEFAULTS["data"]["cache_dir"]) / "ui")  # decoded data images; never the run's own cache
MAX_SEED = 2**32 - 1
EVERY_CLASS = "every class, one row each"
PAGE_WIDTH = 920      # px of the main column on a 1400-px-wide window with the sidebar open: sheets wrap to it
GUTTER_MAX = 170      # px of row labels at most: longer ones are cut short (captions say them whole)
AUTO_TILE = 128       # "auto" zoom: the smallest whole factor that draws an image at least this wide
ZOOMS = ["auto", 1, 2, 3, 4, 6, 8]
PER_ROW = ["auto", 2, 3, 4, 5, 6, 7, 8, 10, 12, 16]  # images per row of a sheet; auto: as many as fit PAGE_WIDTH
NUM_AXES = 6          # principal axes of the prior offered as sliders
METRIC_NAMES = {      # known metrics first, in this order; any other numeric metric follows under its own key
    "fid": "FID", "fd_eff": "FD (EfficientNet)", "kid": "KID", "precision": "precision", "recall": "recall",
    "class_acc_gen": "class accuracy of samples", "val_neg_elbo": "val −ELBO", "val_bits_per_dim": "val bits/dim",
    "val_recon": "val reconstruction", "val_kl": "val KL", "val_mse": "val MSE", "active_units": "active units",
    "best_val_neg_elbo": "best val −ELBO", "loss": "train loss", "recon": "train reconstruction", "kl": "train KL",
    "beta": "β"}
NOT_METRICS = {"epoch", "step"}  # saved among the metrics too, but the table has them as columns already
SIZE_DEPENDENT = {"val_neg_elbo", "val_recon", "val_kl", "best_val_neg_elbo", "loss", "recon", "kl"}  # nats per image
HIGHER_IS_BETTER = {"precision", "recall", "class_acc_gen", "active_units"}
LOWER_IS_BETTER = {"fid", "fd_eff", "kid", "val_neg_elbo", "val_bits_per_dim", "val_recon", "val_mse",
                   "best_val_neg_elbo", "loss", "recon"}
# widget values kept while their tab is hidden (a hidden tab's widgets are not drawn, and Streamlit would
# forget them); the class pickers among them are reset when the models' classes change
KEPT_WIDGETS = ("zoom", "per_row", "sample_class", "per_class", "num_samples", "seed", "temperature", "enlarge",
                "data_folder", "num_recon", "recon_seed", "held_out", "upload_class", "latent_model",
                "latent_temperature", "latent_walk", "interp_model", "interp_mode", "interp_steps", "interp_slerp",
                "interp_temperature", "class_a", "class_b", "interp_seed",
                *(f"{point}_{what}" for point in ("a", "b", "latent")
                  for what in ("from", "seed", "index", "class", "upload", "image_filter", "image_pick")),
                *(f"axis_{i}" for i in range(NUM_AXES)))
CLASS_WIDGETS = ("sample_class", "latent_class", "upload_class", "class_a", "class_b", "a_class", "b_class")
TABS = ["Samples", "Reconstructions", "Your pictures", "Latent space", "Interpolation"]

# ----------------------------------------------------------------------------------------------------
# command line, paths and messages


def parse_args(argv):
    """Options after `--` on the streamlit command line. Unknown ones are returned, to be shown, not fatal."""
    p = argparse.ArgumentParser(prog="streamlit run ui.py --", add_help=False, exit_on_error=False)
    p.add_argument("--checkpoint", default="", help="open this checkpoint first")
    p.add_argument("--best-dir", default=DEFAULTS["run"]["best_dir"], help="folder of best checkpoints (*.pt)")
    p.add_argument("--logs-dir", default=DEFAULTS["run"]["log_dir"], help="folder of run folders (<run>/*.pt)")
    p.add_argument("--cache-dir", default=UI_CACHE_DIR, help="where decoded data images are cached ('' = nowhere)")
    try:
        args, unknown = p.parse_known_args(argv)
    except argparse.ArgumentError as e:  # e.g. --checkpoint with no value: say so, run with the defaults
        args, unknown = p.parse_known_args([])[0], [str(e)]
    usage = p.format_usage().strip().removeprefix("usage:").strip()
    return args, unknown, " ".join(usage.split())


def clean_path(text):
    """A path as people type or paste it: surrounding spaces and quotes dropped, ~ expanded."""
    text = (text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return str(Path(text).expanduser()) if text else ""


def shown_path(path):
    """Relative to the working directory when it is below it: shorter, and what the user typed."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def checkpoint_problem(path):
    """Why `path` cannot be a checkpoint, in words that say what to do; None when it may be one."""
    p = Path(path)
    if p.is_dir():
        inside = sorted(q.name for q in p.glob("*.pt"))[:5]
        hint = f" It holds {', '.join(inside)}: type one of those." if inside else " It holds no .pt file."
        return f"`{path}` is a folder, not a checkpoint file.{hint}"
    if not p.exists():
        return (f"`{path}` does not exist. Checkpoints are `{DEFAULTS['run']['best_dir']}/<run>.pt` and "
                f"`{DEFAULTS['run']['log_dir']}/<run>/last.pt`; train one with `{TRAIN_COMMAND}`.")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(p):
        return f"`{path}` is a damaged checkpoint (cut short, as by a full disk or an unfinished copy?)."
    if not head.startswith(b"PK"):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return (f"`{path}` is an image, not a checkpoint. To reconstruct a picture of your own, "
                    f"open a model and drop the picture on the *Your pictures* tab.")
        return f"`{path}` is not a PyTorch checkpoint. Checkpoints are the `.pt` files that run_vae.py saves."
    return None


def data_folder_problem(path):
    """Why `path` cannot be a data folder; None when it may be one (the loader then checks its contents)."""
    if not path:
        return "Type the path of a data folder: one sub-folder of images per class."
    p = Path(path)
    if p.is_file():
        return (f"`{path}` is a file, not a folder. The data folder holds one sub-folder of images per class, "
                f"e.g. `{p.parent}` if this image is in it.")
    if not p.exists():
        return f"Data folder `{path}` does not exist. It holds one sub-folder of images per class."
    return None


def modification_time(path):
    """st_mtime_ns, or None for a file that is missing (the loader then says so)."""
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return None


def find_checkpoints(best_dir, logs_dir):
    """<best_dir>/*.pt and <logs_dir>/<run>/*.pt with their modification times, newest first."""
    found = []
    for path in [*Path(best_dir).glob("*.pt"), *Path(logs_dir).glob("*/*.pt")]:
        mtime = modification_time(path)
        if mtime is not None:  # a file can vanish between listing and stat while a run replaces it
            found.append((str(path), mtime))
    return sorted(found, key=lambda f: f[1], reverse=True)


def slug(text):
    """A piece of a file name: letters, digits, dots, dashes and underscores."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"

# ----------------------------------------------------------------------------------------------------
# the checkpoint table


def numeric_metrics(metrics):
    """The metrics that are plain numbers (a checkpoint may carry other things under `metrics` some day)."""
    return {k: float(v) for k, v in (metrics or {}).items() if k not in NOT_METRICS
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@st.cache_data(max_entries=500, show_spinner=False)
def checkpoint_summary(path, mtime):
    """What the table says about a checkpoint. Reading it means loading it, so this is cached per (path, mtime)."""
    problem = checkpoint_problem(path)
    if problem:
        return {"error": problem}
    try:
        ckpt = load_checkpoint(path)
        cfg = ckpt["config"]
        return {"run": cfg["run"]["name"], "kind": ckpt.get("kind", "?"), "epoch": ckpt["epoch"],
                "metrics": numeric_metrics(ckpt.get("metrics")), "classes": list(ckpt["classes"]),
                "conditional": bool(cfg["model"]["conditional"]), "image_size": cfg["data"]["image_size"],
                "latent_dim": cfg["model"]["latent_dim"], "prior": prior_description(ckpt), "error": ""}
    except Exception as e:  # the table only lists it; opening it shows the full message
        return {"error": str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"}


def metric_keys(summaries):
    """Every numeric metric any of these checkpoints has: the known ones in a fixed order, then the rest."""
    present = {k for s in summaries for k in s.get("metrics", {})}
    return [k for k in METRIC_NAMES if k in present] + sorted(present - set(METRIC_NAMES))


def model_labels(paths, summaries):
    """Short names that tell the models apart: run · kind · epoch, and where that repeats the end of the path
    (as much of it as it takes: the file name, then its folder too, ...)."""
    base = {p: (f"{s['run']} · {s['kind']} · ep {s['epoch']}" if not s["error"] else "⚠ unreadable")
            for p, s in zip(paths, summaries)}
    labels = {}
    for p, label in base.items():
        twins = [q for q in paths if base[q] == label]
        if len(twins) == 1:
            labels[p] = label
            continue
        parts = Path(shown_path(p)).parts
        depth = next((d for d in range(1, len(parts) + 1)
                      if sum(Path(shown_path(q)).parts[-d:] == parts[-d:] for q in twins) == 1), len(parts))
        labels[p] = f"{label} · {'/'.join(parts[-depth:])}"
    return labels


def checkpoint_table(paths, mtimes, summaries, keys):
    """One row per checkpoint: run, kind, epoch, every metric, the model, its prior, when saved and where."""
    rows = []
    for path, mtime, s in zip(paths, mtimes, summaries):
        saved = datetime.fromtimestamp(mtime / 1e9) if mtime else None  # local time, as the file manager shows
        if s["error"]:
            rows.append({"run": "⚠ unreadable", "saved": saved, "path": shown_path(path), "problem": s["error"]})
            continue
        kind = f"CVAE ({len(s['classes'])} classes)" if s["conditional"] else "VAE"
        rows.append({"run": s["run"], "kind": s["kind"], "epoch": s["epoch"],
                     **{METRIC_NAMES.get(k, k): s["metrics"].get(k) for k in keys},
                     "model": f"{kind}, {s['image_size']} px, z {s['latent_dim']}", "prior": s["prior"],
                     "saved": saved, "path": shown_path(path), "problem": ""})
    columns = ["run", "kind", "epoch", *(METRIC_NAMES.get(k, k) for k in keys), "model", "prior", "saved", "path",
               "problem"]
    return pd.DataFrame(rows, columns=columns)


def add_typed_checkpoint():
    """The sidebar's path field: check the path, then list it in the table and open it."""
    path = clean_path(st.session_state.get("typed_path"))
    if not path:
        st.session_state["typed_problem"] = ""
        return
    problem = checkpoint_problem(path)
    st.session_state["typed_problem"] = problem or ""
    if not problem:
        extra = st.session_state.setdefault("extra_paths", [])
        if path not in extra:
            extra.append(path)
        st.session_state["chosen"] = [path]


def first_choice(args, paths):
    """The models open when a session starts: those in the page address, else --checkpoint, else the newest."""
    linked = [clean_path(p) for p in st.query_params.get_all("model")]
    if linked:
        return linked
    return [clean_path(args.checkpoint)] if args.checkpoint else paths[:1]


def choose_models(args):
    """The checkpoint table, sortable by any column; its ticked rows are the models shown (2+ to compare)."""
    found = find_checkpoints(args.best_dir, args.logs_dir)
    paths, mtimes = [p for p, _ in found], [m for _, m in found]
    if "chosen" not in st.session_state:
        st.session_state["chosen"] = first_choice(args, paths)
    by_file = {Path(p).resolve(): p for p in paths}  # the same file may be named relative or absolute
    for extra in [*st.session_state.get("extra_paths", []), *st.session_state["chosen"]]:
        if extra and Path(extra).resolve() not in by_file:  # opened by path, outside the folders listed
            by_file[Path(extra).resolve()] = extra
            paths.append(extra)
            mtimes.append(modification_time(extra))
    # a click in the table changes its selection; anything else (a file appearing) only moves rows around
    table_state = st.session_state.get("checkpoint_table")
    shown_before = st.session_state.get("table_paths", [])
    if table_state is not None and list(table_state["selection"]["rows"]) != st.session_state.get("table_rows"):
        st.session_state["chosen"] = [shown_before[i] for i in table_state["selection"]["rows"]
                                      if i < len(shown_before)]
    chosen = list(dict.fromkeys(by_file[Path(p).resolve()] for p in st.session_state["chosen"] if p))
    rows = [paths.index(p) for p in chosen]
    st.session_state["checkpoint_table"] = {"selection": {"rows": rows, "columns": [], "cells": []}}
    st.session_state["table_rows"], st.session_state["table_paths"] = rows, paths
    summaries = [checkpoint_summary(p, m) if m is not None else {"error": checkpoint_problem(p)}
                 for p, m in zip(paths, mtimes)]
    show_checkpoint_table(args, paths, mtimes, summaries)
    st.query_params["model"] = [shown_path(p) for p in chosen]
    labels = model_labels(paths, summaries)
    return [(p, labels[p]) for p in chosen]


def show_checkpoint_table(args, paths, mtimes, summaries):
    where = f"`{shown_path(args.best_dir)}/*.pt` and `{shown_path(args.logs_dir)}/*/*.pt`"
    if not paths:
        st.info(f"No checkpoints in {where} yet. Train one, then reload this page:\n\n```bash\n{TRAIN_COMMAND}\n"
                f"```\n\n(`make demo` does the same and then tests the model.) Or type the path of a checkpoint "
                f"in the sidebar.")
        return
    keys = metric_keys([s for s in summaries if not s["error"]])
    table = checkpoint_table(paths, mtimes, summaries, keys)
    config = {"saved": st.column_config.DatetimeColumn("saved", format="YYYY-MM-DD HH:mm"),
              "epoch": st.column_config.NumberColumn("epoch", format="%d"),
              **{METRIC_NAMES.get(k, k): st.column_config.NumberColumn(format="%.4g") for k in keys}}
    if not table["problem"].astype(bool).any():
        table = table.drop(columns="problem")
    st.caption(f"**Checkpoints** in {where}, newest first. Tick one to open it, two or more to compare them; "
               f"click a column's name to sort.")
    st.dataframe(table, key="checkpoint_table", on_select="rerun", selection_mode="multi-row", hide_index=True,
                 placeholder="–", column_config=config, height=min(38 + 35 * len(table), 260))

# ----------------------------------------------------------------------------------------------------
# models and data, loaded once


@st.cache_resource(max_entries=6, show_spinner="Loading the model…")
def load_model(path, mtime):
    """The model in eval mode and the checkpoint's metadata, once per (path, modification time)."""
    ckpt = load_checkpoint(path)
    # channels_last: the transposed convolutions run about a third faster on the CPU, same results
    model = model_from_checkpoint(ckpt, pick_device("auto")).to(memory_format=torch.channels_last)
    meta = {k: ckpt[k] for k in ("config", "classes", "epoch")}
    meta["step"] = ckpt.get("step", "?")
    meta["metrics"] = numeric_metrics(ckpt.get("metrics"))
    meta["kind"] = ckpt.get("kind", "?")
    meta["prior"] = prior_description(ckpt)
    if ckpt["config"]["model"].get("prior_components", 1) > 1:  # its sliders are one Gaussian's coordinates
        meta["prior"] += "; the gallery draws from each class's single Gaussian"
    return model, meta


class Opened:
    """A model on the page: where it came from, its short label, the network and the checkpoint's metadata."""

    def __init__(self, path, label, model, meta):
        self.path, self.label, self.model, self.meta = path, label, model, meta
        self.classes, self.run = meta["classes"], meta["config"]["run"]["name"]

    def class_index(self, name):
        """Index of a class name in this model's labels; None for a name it lacks or an unconditional model."""
        return self.classes.index(name) if self.model.num_classes and name in self.classes else None


def open_models(chosen):
    """Load each chosen checkpoint; a file that cannot be used shows why, and the others still open."""
    opened = []
    for path, label in chosen:
        problem = checkpoint_problem(path)
        try:
            if problem:
                raise CheckpointError(problem)
            model, meta = load_model(str(path), modification_time(path))
        except CheckpointError as e:
            st.error(f"**{label}**: {e}")
            continue
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # tagged as ours, not what this version reads
            st.error(f"**{label}**: `{shown_path(path)}` cannot be used: {type(e).__name__}: {e}")
            continue
        opened.append(Opened(path, label, model, meta))
    return opened


def folder_stamp(root):
    """Changes when a class folder is added, removed or has files added/removed: enough to reload the cache."""
    root = Path(root)
    if not root.is_dir():
        return None
    return tuple((p.name, p.stat().st_mtime_ns) for p in sorted([root, *root.iterdir()]) if p.is_dir())


@st.cache_resource(max_entries=4, show_spinner="Reading images…")
def load_images(root, image_size, cache_dir, stamp):
    return load_image_folder(root, image_size, cache_dir or None)


def device_of(model):
    return next(model.parameters()).device

# ----------------------------------------------------------------------------------------------------
# generation


def prior_noise(n, latent_dim, seed, temperature=1.0):
    """n rows of standard normal noise for a seed, drawn as VAE.sample draws them. VAE.prior_z maps noise into
    the model's prior."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)) * temperature


@torch.no_grad()
def decode(model, z, class_weights=None):
    """Decode z; for a CVAE with a blend of classes per row (rows of class_weights sum to 1)."""
    z = z.to(device_of(model))
    with shared_noise(model, 0):  # a decoder with model.noise: the same detail for the same code, in any batch
        if class_weights is None:
            return model.decode(z)
        return model.decode(z, class_weights.float().to(device_of(model)))  # float rows: a blend of classes


@torch.no_grad()
def decode_noise(model, eps, class_weights=None):
    """Decode prior noise: through the model's prior (per class, blended with the label), then the decoder."""
    y = None if class_weights is None else class_weights.float().to(device_of(model))
    return decode(model, model.prior_z(eps.to(device_of(model)), y), class_weights)


def one_hot(model, k, n=1):
    """n rows of class k as decoder input; None for an unconditional model."""
    return torch.eye(model.num_classes)[[k] * n] if model.num_classes else None


def grid_noise(n, latent_dim, seed, temperature=1.0):
    """The noise of samples 0..n-1 of a seed, drawn in blocks of 16 rows so that sample i is the same whatever n
    (torch's normal draws differ below 16 values and in a last, partial block of 16). For latent sizes that are
    multiples of 16 these are also the draws of VAE.sample and sample_grid."""
    return prior_noise(16 * math.ceil(n / 16), latent_dim, seed, temperature)[:n]


@torch.no_grad()
def prior_samples(model, n, seed, temperature, class_index=None):
    """n samples from the prior -> a list of rows: one per class for a CVAE with class_index None (the same
    noise in every row, so only the class changes down a column), else one row."""
    eps = grid_noise(n, model.latent_dim, seed, temperature)
    if not model.num_classes:
        return [decode_noise(model, eps)]
    classes = range(model.num_classes) if class_index is None else [class_index]
    return [decode_noise(model, eps, one_hot(model, k, n)) for k in classes]


def interpolate(a, b, steps, spherical=True):
    """`steps` points from a to b (both included). Spherical keeps |z| typical of the prior all the way:
    a straight line between two random z passes close to 0, where samples wash out to the average image."""
    t = torch.linspace(0, 1, steps)[:, None]
    if spherical:
        cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
        omega = torch.arccos(cos)
        if omega.abs() > 1e-4:  # nearly parallel: the line is the arc
            return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return (1 - t) * a + t * b


@torch.no_grad()
def encode_mean(model, images_uint8, labels):
    """Posterior means: what the model makes of real images, without sampling noise."""
    x = to_float(images_uint8).to(device_of(model))
    y = labels.to(device_of(model)) if model.num_classes else None
    mu, _ = model.encode(x, y)
    return mu


@torch.no_grad()
def reconstruct(model, images_uint8, labels):
    """Decoded posterior means of real images (uint8, at the model's size)."""
    mu = encode_mean(model, images_uint8, labels)
    with shared_noise(model, 0):
        return model.decode(mu, labels.to(device_of(model)) if model.num_classes else None)


@torch.no_grad()
def noise_of(model, z, k):
    """The prior noise that class k's Gaussian maps to z (the inverse of prior_z): lets a real image's code
    and a prior sample be interpolated in the same coordinates."""
    k = k or 0
    return torch.linalg.solve_triangular(model.prior_scale_tril[k].cpu(),
                                         (z.cpu() - model.prior_mean[k].cpu())[:, None], upper=False)[:, 0]


@torch.no_grad()
def principal_axes(model, k):
    """Class k's prior Gaussian along its main directions: (unit axes as rows, std along each, share of the
    variance), largest first. For N(0, I) every direction is alike and these are just the coordinates."""
    tril = model.prior_scale_tril[k or 0].double().cpu()
    variances, vectors = torch.linalg.eigh(tril @ tril.T)
    order = variances.flip(0).clamp_min(0)
    return vectors.flip(1).T.float(), order.sqrt().float(), (order / order.sum()).float()


def read_picture(data, size):
    """An uploaded picture -> uint8 (3, size, size), resized and centre-cropped as the training data was."""
    return decode_image(io.BytesIO(data), size)

# ----------------------------------------------------------------------------------------------------
# pictures: what the page shows and what the downloads hold


def auto_zoom(image_size):
    return max(1, math.ceil(AUTO_TILE / image_size))


def tile_px(zoom, image_size):
    return image_size * (auto_zoom(image_size) if zoom == "auto" else int(zoom))


def to_pil(image):
    """A float (3, H, W) image in [0, 1] -> PIL RGB, quantized like make_grid_image."""
    array = (image.float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def enlarged(image, px):
    """Nearest-neighbour upscaling to px: every pixel of a small image stays a sharp square."""
    im = to_pil(image) if isinstance(image, torch.Tensor) else image
    return im if im.width == px else im.resize((px, px), Image.Resampling.NEAREST)


def font(size):
    return ImageFont.load_default(size=size)


def tile_sheet(rows, px, width=PAGE_WIDTH, numbers=False, per_line="auto", gap=4):
    """Rows of images drawn px wide, wrapped to fit `width` (or per_line images) with the rows of each stretch
    kept together (real above its reconstruction, class above class). rows: [(label or None, images)].
    numbers: the column index above each stretch, to pick a sample by."""
    labels = [fitted_text(label, GUTTER_MAX) if label else None for label, _ in rows]
    gutter = (12 + max(font(15).getbbox(label or "")[2] for label in labels)) if any(labels) else 0
    count = max(len(images) for _, images in rows)
    if per_line == "auto":  # as many as fit, then evened out: 8 in lines of 4 and 4 rather than 6 and 2
        fit = max(1, (width - gutter + gap) // (px + gap))
        per_line = math.ceil(count / math.ceil(count / fit))
    per_line = min(count, int(per_line))
    header = 18 if numbers else 0
    stretches = math.ceil(count / per_line)
    width = gutter + per_line * (px + gap) - gap
    height = stretches * (header + len(rows) * (px + gap)) - gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for s in range(stretches):
        columns = range(s * per_line, min(count, (s + 1) * per_line))
        if numbers:
            for c in columns:
                draw.text((gutter + (c - s * per_line) * (px + gap) + px // 2, y + 9), f"{c}", fill="#666",
                          font=font(12), anchor="mm")
            y += header
        for label, (_, images) in zip(labels, rows):
            if label:
                draw.text((4, y + px // 2), label, fill="black", font=font(15), anchor="lm")
            for c in columns:
                if c < len(images):
                    sheet.paste(enlarged(images[c], px), (gutter + (c - s * per_line) * (px + gap), y))
            y += px + gap
    return sheet


def fitted_text(text, width, size=15):
    """text, cut short with … to fit width px."""
    if font(size).getbbox(text)[2] <= width:
        return text
    while text and font(size).getbbox(text + "…")[2] > width:
        text = text[:-1]
    return text + "…"


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # the default level takes ~0.2 s for a 64-image grid
    return buf.getvalue()


def gif_bytes(images, px, frame_ms=120):
    """An animated GIF going from the first image to the last and back, each frame px wide."""
    frames = [enlarged(im, px) for im in images]
    frames = frames + frames[-2:0:-1]  # back again, so the loop has no jump
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


def samples_zip(groups, manifest):
    """A ZIP of single PNGs at the model's resolution, and manifest.json that says how to make them again.
    groups: [(folder, [(file name, image)])]."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for folder, files in groups:
            for name, image in files:
                z.writestr(f"{folder}/{name}" if folder else name, png_bytes(to_pil(image)))
        z.writestr("manifest.json", json.dumps(manifest, indent=2))
    return buf.getvalue()


def data_url(image, px=56):
    """A thumbnail as a data: URL, for the image column of a table."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(enlarged(image, px))).decode()


def show_sheet(rows, px, name, key, numbers=False, width=PAGE_WIDTH, more=()):
    """Draw a sheet and offer it as a PNG, beside the download buttons `more` (keyword arguments of each).
    Returns its pixels (tests and scripts read exactly what is shown)."""
    sheet = tile_sheet(rows, px, width, numbers, st.session_state.get("per_row", "auto"))
    png = png_bytes(sheet)
    st.image(png, output_format="PNG")
    with st.container(horizontal=True):
        st.download_button("PNG", png, file_name=f"{name}.png", mime="image/png", key=key, on_click="ignore",
                           icon=":material/download:", help="This picture, as shown")
        for button in more:
            st.download_button(**button, on_click="ignore")
    return np.asarray(sheet)

# ----------------------------------------------------------------------------------------------------
# controls


def remember(key, default):
    """A widget's first value, given through session state so that the widget is drawn without one: then the
    page address can set it, and keep_hidden_widgets can hold it while its tab is hidden."""
    st.session_state.setdefault(key, default)


def keep_hidden_widgets():
    """Only the open tab is drawn, and Streamlit forgets the values of widgets it did not draw: keep them."""
    for key in KEPT_WIDGETS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def reset_class_widgets(models):
    """Class pickers hold class names; when other classes are on the page, start them afresh."""
    classes = tuple(tuple(m.classes) for m in models)
    if st.session_state.get("page_classes") != classes:
        for key in CLASS_WIDGETS:
            st.session_state.pop(key, None)
        st.session_state["page_classes"] = classes


def choice(label, options, key, default=None, **kwargs):
    """A selectbox over `options` (strings) whose value survives hidden tabs and lives in the page address."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default if default in options else options[0]
    return st.selectbox(label, options, key=key, bind="query-params", **kwargs)


def seed_input(label, key, default=0):
    """A seed box that says so when the number typed is not a seed, instead of quietly keeping the old one."""
    remember(key, default)
    seed = st.number_input(label, step=1, key=key, bind="query-params",
                           help=f"A whole number from 0 to {MAX_SEED:,}: the same seed always gives the same images.")
    if not 0 <= seed <= MAX_SEED:
        used = min(max(int(seed), 0), MAX_SEED)
        st.warning(f"Seed {seed:,} is out of range: seeds are whole numbers from 0 to {MAX_SEED:,}. "
                   f"Showing seed {used:,}.")
        return used
    return int(seed)


def temperature_slider(key, label="Temperature"):
    remember(key, 1.0)
    return st.slider(label, 0.0, 2.0, step=0.05, key=key, bind="query-params",
                     help="Scale of the prior's spread: 0 decodes its mean, above 1 wilder samples")


def model_picker(models, key):
    """With several models open, which one a single-model section uses."""
    if len(models) == 1:
        return models[0]
    labels = [m.label for m in models]
    return models[labels.index(choice("Model", labels, key))]


def display_controls(models):
    """Sidebar: how large images are drawn, and how many to a row. Returns the zoom."""
    size = models[0].model.image_size
    remember("zoom", "auto")
    remember("per_row", "auto")
    st.sidebar.select_slider("Images per row", PER_ROW, key="per_row", bind="query-params",
                             format_func=lambda n: "auto (fit the page)" if n == "auto" else str(n),
                             help="auto fits a 1400-px-wide window; on a wider screen allow more")
    return st.sidebar.select_slider(
        "Image size on screen", ZOOMS, key="zoom", bind="query-params",
        format_func=lambda z: f"auto ({tile_px('auto', size)} px)" if z == "auto" else f"{z}x",
        help="Images are drawn this many times their size, without smoothing, so every pixel stays a sharp "
             "square. Comparing models of different sizes: all are drawn as wide as the first one.")


def model_note(m):
    """One line under a model's name: its main scores."""
    metrics = m.meta["metrics"]
    parts = [f"{METRIC_NAMES.get(k, k)} {metrics[k]:.4g}" for k in ("fid", "fd_eff", "precision", "recall",
                                                                   "val_neg_elbo") if k in metrics]
    return " · ".join(parts) or "no metrics saved"

# ----------------------------------------------------------------------------------------------------
# samples: one model, or several side by side


def sample_rows(m, settings):
    """[(row label or None, images)] of one model for the page's seed, class and temperature; None when the
    model lacks the class asked for."""
    name = settings["class"]
    k = m.class_index(name)
    if m.model.num_classes and name not in (None, EVERY_CLASS) and k is None:
        return None
    rows = prior_samples(m.model, settings["n"], settings["seed"], settings["temperature"], k)
    labels = m.classes if m.model.num_classes and k is None else [None]
    return list(zip(labels, rows))


def samples_name(m, settings):
    what = f"_{slug(settings['class'])}" if settings["class"] not in (None, EVERY_CLASS) else ""
    return f"{slug(m.run)}_ep{m.meta['epoch']}_samples_seed{settings['seed']}_t{settings['temperature']:g}{what}"


@st.fragment  # a control here reruns only this section: the grid follows the sliders at once
def samples_section(models, zoom):
    names = list(dict.fromkeys(c for m in models if m.model.num_classes for c in m.classes))
    c = st.columns([2, 2, 2, 3, 2])
    which = None
    if names:
        with c[3]:
            which = choice("Class", [EVERY_CLASS, *names], "sample_class")
    every = which == EVERY_CLASS
    with c[0]:
        key = "per_class" if every else "num_samples"
        remember(key, 6 if every else 32)
        n = st.slider("Samples per class" if every else "Samples", 1, 32 if every else 256, key=key,
                      bind="query-params")
    with c[1]:
        seed = seed_input("Seed", "seed")
    with c[2]:
        temperature = temperature_slider("temperature")
    settings = {"n": n, "seed": seed, "temperature": temperature, "class": which}
    archive = {"label": "ZIP: each sample + manifest", "data": lambda: samples_archive(models, settings),
               "file_name": f"{samples_name(models[0], settings)}.zip", "mime": "application/zip",
               "key": "download_zip", "icon": ":material/folder_zip:",
               "help": "Each sample at the model's resolution, and manifest.json with the checkpoint's file and "
                       "SHA-256, seed, temperature, class and prior, to make them again"}
    if len(models) == 1:
        single_samples(models[0], settings, zoom, c[4], archive)
    else:
        compare_samples(models, settings, zoom, archive)


def single_samples(m, settings, zoom, picker_column, archive):
    rows = sample_rows(m, settings)
    px = tile_px(zoom, m.model.image_size)
    which = settings["class"]
    what = (", one row per class with the same noise down each column" if which == EVERY_CLASS
            else f", class {which}" if which else "")
    st.caption(f"{sum(len(r) for _, r in rows)} samples from the prior ({m.meta['prior']}), seed {settings['seed']}, "
               f"temperature {settings['temperature']:g}{what}. The same seed always gives the same images; "
               f"pick a number above its column to see one large.")
    with picker_column:
        picked = enlarge_picker(rows)
    if picked != "none":
        enlarge_sample(m, rows, settings, picked)
    # kept so tests (and anyone scripting the app) can read exactly the pixels on screen
    st.session_state["samples_grid"] = show_sheet(rows, px, samples_name(m, settings), "download_samples",
                                                  numbers=True, more=[archive])


def enlarge_picker(rows):
    options = ["none"] + [f"{label} #{i}" if label else f"#{i}" for label, images in rows for i in range(len(images))]
    return choice("Look closer at", options, "enlarge", help="The numbers are those above the grid's columns")


def enlarge_sample(m, rows, settings, picked):
    """One sample large, to download alone or to explore the latent space around."""
    label, _, number = picked.rpartition("#")
    label, index = label.strip() or None, int(number)
    image = dict(rows)[label][index]
    big = m.model.image_size * max(2, math.ceil(384 / m.model.image_size))
    left, right = st.columns([2, 3])
    with left:
        png = png_bytes(enlarged(image, big))
        st.image(png, caption=f"{picked}: drawn {big // m.model.image_size}x, without smoothing")
    with right:
        st.markdown(f"**{picked}** of seed {settings['seed']}, temperature {settings['temperature']:g}"
                    + (f", class {label}" if label else ""))
        st.download_button("This sample (PNG, actual size)", png_bytes(to_pil(image)), on_click="ignore",
                           file_name=f"{samples_name(m, settings)}_{slug(label or 'sample')}_{index}.png",
                           mime="image/png", key="download_one", icon=":material/download:")
        if st.button("Explore the latent space around it", key="explore", on_click=explore_sample,
                     args=(m.label, settings, label, index), icon=":material/explore:"):
            st.rerun(scope="app")  # the tab changes: the whole page is drawn again


def explore_sample(label, settings, class_name, index):
    """Open the Latent space tab on this sample (same model, seed, number, class and temperature)."""
    st.session_state.update({"latent_model": label, "latent_from": "A sample", "latent_seed": settings["seed"],
                             "latent_index": index, "latent_temperature": settings["temperature"],
                             "tab": "Latent space", **{f"axis_{i}": 0.0 for i in range(NUM_AXES)}})
    if class_name:
        st.session_state["latent_class"] = class_name


def compare_rows(models, settings):
    """The models' samples as rows of one sheet, the models of each class next to each other, so that the
    same column is the same noise: rows labelled "<model number> · <class>". Unconditional models come last."""
    names = list(dict.fromkeys(c for m in models if m.model.num_classes for c in m.classes))
    which = settings["class"]
    rows = []
    for name in (names if which == EVERY_CLASS else [which]):
        for number, m in enumerate(models, 1):
            if m.model.num_classes and (name is None or name in m.classes):
                images = prior_samples(m.model, settings["n"], settings["seed"], settings["temperature"],
                                       m.classes.index(name))[0]
                rows.append((f"{number} · {name}", images))
    for number, m in enumerate(models, 1):
        if not m.model.num_classes:
            rows.append((f"{number} · any class" if which else f"{number}", sample_rows(m, settings)[0][1]))
    return rows


def compare_samples(models, settings, zoom, archive):
    px = tile_px(zoom, models[0].model.image_size)
    st.caption(f"The same seed ({settings['seed']}), temperature ({settings['temperature']:g}) and class for every "
               f"model, each from its own prior; a column is the same noise (for models of one latent size). "
               f"All drawn {px} px wide. Rows are numbered by model:")
    st.markdown("\n".join(f"{number}. **{m.label}** — {model_note(m)} · prior {m.meta['prior']}"
                          for number, m in enumerate(models, 1)))
    lacking = [f"{number}" for number, m in enumerate(models, 1)
               if m.model.num_classes and settings["class"] not in (EVERY_CLASS, *m.classes)]
    if lacking:
        st.info(f"Model {', '.join(lacking)} has no class {settings['class']}.")
    rows = compare_rows(models, settings)
    st.session_state["compare_rows"] = rows
    st.session_state["samples_grid"] = show_sheet(rows, px, f"compare_{samples_name(models[0], settings)}",
                                                  "download_samples", numbers=True, more=[archive])
    st.markdown("**Metrics**, and each model's difference to model 1")
    table = metrics_table(models)
    st.dataframe(table, hide_index=True, placeholder="–", column_config={
        c: st.column_config.NumberColumn(format="%.4g") for c in table.columns if c not in ("metric", "best")})


def metrics_table(models):
    """metric | each model | each other model minus the first | which is best (when the direction is known)."""
    keys = metric_keys([{"metrics": m.meta["metrics"]} for m in models])
    names = [f"{number}: {m.label}" for number, m in enumerate(models, 1)]
    rows = []
    for k in keys:
        values = [m.meta["metrics"].get(k) for m in models]
        row = {"metric": METRIC_NAMES.get(k, k), **dict(zip(names, values))}
        for number, v in enumerate(values[1:], 2):
            row[f"{number} − 1"] = None if v is None or values[0] is None else v - values[0]
        row["best"] = best_of(k, models, values)
        rows.append(row)
    columns = ["metric", *names, *(f"{number} − 1" for number in range(2, len(models) + 1)), "best"]
    return pd.DataFrame(rows, columns=columns)


def best_of(key, models, values):
    """Which model a metric favours: its number, "tie", "sizes differ" (nats per image of other image sizes do
    not compare), or "" when higher is not simply better or worse."""
    present = [v for v in values if v is not None]
    if len(present) < 2 or key not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
        return ""
    if key in SIZE_DEPENDENT and len({m.model.image_size for m in models}) > 1:
        return "sizes differ"
    best = min(present) if key in LOWER_IS_BETTER else max(present)
    winners = [number for number, v in enumerate(values, 1) if v == best]
    return str(winners[0]) if len(winners) == 1 else "tie"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def samples_archive(models, settings):
    """The ZIP behind the download button: made when clicked, so hashing the checkpoints costs nothing before."""
    groups, entries = [], []
    for m in models:
        rows = sample_rows(m, settings)
        if rows is None:
            continue
        folder = slug(m.label) if len(models) > 1 else ""
        files = [(f"{slug(label or 'sample')}_{i:03d}.png", image, label)
                 for label, images in rows for i, image in enumerate(images)]
        groups.append((folder, [(name, image) for name, image, _ in files]))
        entries.append({"folder": folder, "checkpoint": shown_path(m.path), "sha256": sha256_of(m.path),
                        "run": m.run, "kind": m.meta["kind"], "epoch": m.meta["epoch"], "prior": m.meta["prior"],
                        "image_size": m.model.image_size, "latent_dim": m.model.latent_dim,
                        "metrics": m.meta["metrics"],
                        "samples": [{"file": name, "index": int(name[-7:-4]), "class": label}
                                    for name, _, label in files]})
    view = {"model": [shown_path(m.path) for m in models], "tab": "Samples", "seed": settings["seed"],
            "temperature": settings["temperature"]}
    if settings["class"]:
        view["sample_class"] = settings["class"]
    view["per_class" if settings["class"] == EVERY_CLASS else "num_samples"] = settings["n"]
    manifest = {"made_by": "ui.py (streamlit run ui.py)", "seed": settings["seed"],
                "temperature": settings["temperature"], "class": settings["class"] or "unconditional",
                "samples": settings["n"], "noise": "torch.randn(16 * ceil(n / 16), latent_dim) from "
                "torch.Generator().manual_seed(seed), first n rows, times the temperature, through the prior",
                "view": "streamlit run ui.py, then open /?" + urlencode(view, doseq=True), "models": entries}
    return samples_zip(groups, manifest)

# ----------------------------------------------------------------------------------------------------
# data images and your own pictures


def open_folder(first, cache_dir, warn):
    """The data folder typed in the Reconstructions tab, read at the first model's size: a dict, or None
    when it can't be used (with warn, a message says why)."""
    cfg = first.meta["config"]
    root = clean_path(st.session_state["data_folder"])
    problem = data_folder_problem(root)
    try:
        if problem:
            raise DataError(problem)
        data = load_images(root, first.model.image_size, cache_dir, folder_stamp(root))
    except (DataError, OSError) as e:
        if warn:
            st.warning(str(e))
        return None
    validation = None
    same_data = Path(root).resolve() == Path(cfg["data"]["root"]).resolve()
    if same_data and cfg["data"]["val_fraction"] > 0:  # the split training made: same folder, fraction and seed
        validation = split_train_val(len(data), cfg["data"]["val_fraction"], cfg["run"]["seed"])[1]
    names = [data.classes[i] for i in data.labels.tolist()]
    return {"root": root, "cache_dir": cache_dir, "data": data, "names": names, "validation": validation}


def folder_images(folder, m, index):
    """Images `index` of the folder at m's size, with labels in m's class numbering (None: unconditional)."""
    data = folder["data"]
    if data.images.shape[-1] != m.model.image_size:  # same files, same order: only the size differs
        data = load_images(folder["root"], m.model.image_size, folder["cache_dir"], folder_stamp(folder["root"]))
    labels = torch.tensor([m.class_index(folder["names"][i]) or 0 for i in index.tolist()], dtype=torch.long)
    return data.images[index], labels


def usable_images(folder, models):
    """Indices of the folder's images whose class every conditional model knows."""
    known = [set(m.classes) for m in models if m.model.num_classes]
    return torch.tensor([i for i, name in enumerate(folder["names"]) if all(name in k for k in known)],
                        dtype=torch.long)


def follow_data_folder(first):
    """Another first model: its own training data by default."""
    cfg_root = first.meta["config"]["data"]["root"]
    if st.session_state.get("page_data_root") != cfg_root:
        st.session_state["data_folder"] = cfg_root
        st.session_state["page_data_root"] = cfg_root


def data_folder_field():
    st.text_input("Data folder (one sub-folder of images per class)", key="data_folder", bind="query-params",
                  help="Defaults to the folder the first model was trained on. `~` and quotes are fine.")


@st.fragment  # a control here reruns only this section
def reconstructions_section(models, folder, zoom):
    c = st.columns(3)
    with c[0]:
        remember("num_recon", 12)
        n = st.slider("Images", 1, 32, key="num_recon", bind="query-params")
    with c[1]:
        pick_seed = seed_input("Pick seed", "recon_seed")
    candidates, which = usable_images(folder, models), "images"
    if folder["validation"] is not None:
        with c[2]:
            remember("held_out", True)
            if st.checkbox("Only validation images (never trained on)", key="held_out", bind="query-params"):
                held_out = set(folder["validation"].tolist())
                candidates, which = torch.tensor([i for i in candidates.tolist() if i in held_out]), "validation images"
    if not len(candidates):
        st.warning(f"No images in `{folder['root']}` belong to a class every model knows.")
        return
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(pick_seed))
    chosen = candidates[order[:n]]
    first = models[0]
    real = to_float(folder_images(folder, first, chosen)[0])
    rows, errors = [("real", real)], []
    for m in models:
        images, labels = folder_images(folder, m, chosen)
        recon = reconstruct(m.model, images, labels).cpu()
        errors.append(f"{m.label + ': ' if len(models) > 1 else ''}"
                      f"{(recon - to_float(images)).pow(2).mean().item():.4f}")
        rows.append((m.label if len(models) > 1 else "reconstruction", recon))
    where = f"cached in `{folder['cache_dir']}`" if folder["cache_dir"] else "not cached on disk"
    st.caption(f"{len(chosen)} random of the {len(candidates)} {which} in `{shown_path(folder['root'])}` (decoded "
               f"images {where}), each above its reconstruction (the decoded posterior mean). Mean squared error "
               f"per pixel: {'; '.join(errors)}.")
    name = f"{slug(first.run)}_ep{first.meta['epoch']}_reconstructions_seed{pick_seed}_{len(chosen)}"
    st.session_state["recon_grid"] = show_sheet(rows, tile_px(zoom, first.model.image_size), name,
                                                "download_recon")


def pictures():
    """Pictures dropped on the page in this session: {file name: bytes}."""
    return st.session_state.setdefault("pictures", {})


def read_pictures(size):
    """The readable pictures at this size -> (names, uint8 images); each unreadable one gets a warning."""
    names, images = [], []
    for name, data in pictures().items():
        try:
            images.append(read_picture(data, size))
            names.append(name)
        except Exception as e:  # PIL says why: not an image, truncated, an unknown format...
            st.warning(f"`{name}` is not a picture we can read ({type(e).__name__}). Try a PNG or JPEG file.")
    return names, images


@st.fragment
def pictures_section(models, zoom):
    files = st.file_uploader("Drop pictures here (PNG, JPEG, WebP or BMP), or browse", key="uploader",
                             type=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS), accept_multiple_files=True)
    for f in files or []:
        pictures()[f.name] = f.getvalue()
    if not pictures():
        st.info("Drop a picture above to see how the model reconstructs it. It is resized and centre-cropped to "
                "the model's image size, like the training images, and stays in this browser session only. "
                "Your pictures can also be ends of an interpolation and starting points in the latent space.")
        return
    first = models[0]
    names, images = read_pictures(first.model.image_size)
    if not names:
        return
    class_names = list(dict.fromkeys(c for m in models if m.model.num_classes for c in m.classes))
    which = None
    if class_names:
        with st.columns([1, 3])[0]:
            which = choice("Reconstruct as class", class_names, "upload_class")
    rows = [("your picture", to_float(torch.stack(images)))]
    for m in models:
        if m.model.num_classes and which not in m.classes:
            st.info(f"{m.label} has no class {which}.")
            continue
        _, own = read_pictures(m.model.image_size) if m.model.image_size != first.model.image_size else (names, images)
        labels = torch.full((len(own),), m.class_index(which) or 0, dtype=torch.long)
        rows.append((m.label if len(models) > 1 else "reconstruction", reconstruct(m.model, torch.stack(own), labels).cpu()))
    st.caption(f"{', '.join(f'`{n}`' for n in names)}, each above its reconstruction"
               + (f" as class {which}" if which else "") + ".")
    st.session_state["pictures_grid"] = show_sheet(rows, tile_px(zoom, first.model.image_size),
                                                   f"{slug(first.run)}_your_pictures", "download_pictures")
    st.button("Forget my pictures", key="forget_pictures", on_click=lambda: pictures().clear())


def image_picker(folder, m, key, label, last=False):
    """Choose a data image by its thumbnail: a table of the folder's images (narrowed by name), one row ticked
    (at first the top one, or with `last` the bottom one). Returns the image's index in the folder, or None."""
    remember(f"{key}_filter", "")
    text = st.text_input(f"{label}: find by name", key=f"{key}_filter", placeholder="part of a file or class name")
    usable = usable_images(folder, [m]).tolist()
    matches = [i for i in usable if text.strip().lower() in folder["data"].files[i].lower()]
    if not matches:
        st.warning(f"No image of `{folder['root']}` has '{text}' in its name.")
        return None
    shown = matches[:100]
    if st.session_state.get(f"{key}_shown") != shown:  # another list: tick its first (or last) row
        rows = [len(shown) - 1 if last else 0]
        st.session_state[f"{key}_pick"] = {"selection": {"rows": rows, "columns": [], "cells": []}}
        st.session_state[f"{key}_shown"] = shown
    images = folder["data"].images[shown]
    validation = set(folder["validation"].tolist()) if folder["validation"] is not None else set()
    table = pd.DataFrame({"image": [data_url(to_float(im)) for im in images],
                          "file": [folder["data"].files[i] for i in shown],
                          "set": ["validation" if i in validation else "training" if validation else "" for i in shown]})
    state = st.dataframe(table, key=f"{key}_pick", on_select="rerun", selection_mode="single-row", hide_index=True,
                         row_height=60, height=250, column_config={"image": st.column_config.ImageColumn("image")})
    if len(matches) > len(shown):
        st.caption(f"The first {len(shown)} of {len(matches)} images: type part of a name to narrow the list.")
    rows = state["selection"]["rows"]
    return shown[rows[0]] if rows and rows[0] < len(shown) else None

# ----------------------------------------------------------------------------------------------------
# the latent space: principal axes of the prior, and interpolation


class Point:
    """A place in the latent space as prior noise: eps, its class k (None: unconditional), the real image it
    came from (None for a prior sample), and words for captions and file names."""

    def __init__(self, eps, k, real, text, name):
        self.eps, self.k, self.real, self.text, self.name = eps, k, real, text, name


def point_from_image(m, image_uint8, k, text, name):
    labels = torch.tensor([k or 0])
    mu = encode_mean(m.model, image_uint8[None], labels)[0]
    return Point(noise_of(m.model, mu, k), k, to_float(image_uint8), text, name)


def pick_point(m, folder, key, title, temperature, default_seed=0, with_index=False):
    """Controls for one point: a prior sample (seed and class), a data image (by thumbnail) or your picture."""
    sources = ["A sample", "A data image", "Your picture"]
    remember(f"{key}_from", sources[0])
    source = st.radio(title, sources, key=f"{key}_from", horizontal=True, bind="query-params")
    class_names = m.classes if m.model.num_classes else []
    if source == "A sample":
        c = st.columns(3 if with_index else 2)
        with c[0]:
            seed = seed_input("Seed", f"{key}_seed", default_seed)
        index = 0
        if with_index:
            with c[1]:
                remember(f"{key}_index", 0)
                index = int(st.number_input("Sample number", 0, 255, step=1, key=f"{key}_index", bind="query-params",
                                            help="The number above the column in the Samples tab"))
        k = None
        if class_names:
            with c[-1]:
                k = class_names.index(choice("Class", class_names, f"{key}_class"))
        eps = grid_noise(index + 1, m.model.latent_dim, seed, temperature)[index]
        what = f" {class_names[k]}" if class_names else ""
        return Point(eps, k, None, f"sample #{index} of seed {seed}{what}",
                     f"seed{seed}" + (f"-{index}" if index else "") + (f"-{slug(class_names[k])}" if class_names else ""))
    if source == "A data image":
        if folder is None:
            st.info("Choose a data folder in the Reconstructions tab first.")
            return None
        i = image_picker(folder, m, f"{key}_image", title, last=key == "b")
        if i is None:
            st.info("Tick an image in the table.")
            return None
        images, labels = folder_images(folder, m, torch.tensor([i]))
        file = folder["data"].files[i]
        k = int(labels[0]) if class_names else None
        return point_from_image(m, images[0], k, f"`{file}`", slug(Path(file).with_suffix("")))
    names, images = read_pictures(m.model.image_size)
    if not names:
        st.info("Drop a picture on the *Your pictures* tab first.")
        return None
    picture = choice("Picture", names, f"{key}_upload")
    k = class_names.index(choice("As class", class_names, f"{key}_class")) if class_names else None
    return point_from_image(m, images[names.index(picture)], k, f"your picture `{picture}`", slug(Path(picture).stem))


@st.fragment
def latent_section(models, folder, zoom):
    m = model_picker(models, "latent_model")
    model = m.model
    top = st.columns([3, 1])
    with top[1]:
        temperature = temperature_slider("latent_temperature", "Temperature (samples)")
    with top[0]:
        start = pick_point(m, folder, "latent", "Start from", temperature, with_index=True)
    if start is None:
        return
    axes, std, share = principal_axes(model, start.k)
    count = min(NUM_AXES, model.latent_dim)
    standard = m.meta["prior"] == "N(0, I)"
    left, right = st.columns([1, 2])
    with left:
        st.markdown("**Along the prior's main directions** (in standard deviations)" if not standard else
                    "**Along the first latent coordinates** (the prior is N(0, I): no direction stands out)")
        offsets = []
        for i in range(count):
            remember(f"axis_{i}", 0.0)
            offsets.append(st.slider(f"Axis {i + 1} · {share[i]:.0%} of the variance", -3.0, 3.0, step=0.25,
                                     key=f"axis_{i}", bind="query-params"))
        st.button("Back to the start", key="reset_axes", icon=":material/restart_alt:",
                  on_click=lambda: st.session_state.update({f"axis_{i}": 0.0 for i in range(count)}))
    z0 = model.prior_z(start.eps[None].to(device_of(model)), one_hot(model, start.k)).cpu()[0]
    shift = (torch.tensor(offsets) * std[:count]) @ axes[:count]
    with right:
        weights = one_hot(model, start.k, 2)
        pair = decode(model, torch.stack([z0, z0 + shift]), weights).cpu()
        big = tile_px(zoom, model.image_size) * 2
        st.caption(f"Left: {start.text}{' (its reconstruction)' if start.real is not None else ''}. "
                   f"Right: moved along the axes as set.")
        st.session_state["latent_pair"] = show_sheet([(None, list(pair))], big, f"{slug(m.run)}_latent_{start.name}",
                                                     "download_latent")
    walk_axis(m, z0 + shift, offsets, axes, std, start, zoom)


def walk_axis(m, z, offsets, axes, std, start, zoom):
    """A strip along one axis from -3 to +3 standard deviations, the other axes as set."""
    model = m.model
    labels = [f"axis {i + 1}" for i in range(len(offsets))]
    with st.columns([1, 3])[0]:
        j = labels.index(choice("Walk along", labels, "latent_walk"))
    values = torch.linspace(-3, 3, 7)
    path = z + (values - offsets[j])[:, None] * std[j] * axes[j]
    strip = decode(model, path, one_hot(model, start.k, len(values))).cpu()
    st.caption(f"Axis {j + 1} at −3, −2, … +3 standard deviations.")
    st.session_state["latent_walk_strip"] = show_sheet(
        [(None, list(strip))], tile_px(zoom, model.image_size), f"{slug(m.run)}_latent_{start.name}_axis{j + 1}",
        "download_walk")


@st.fragment
def interpolation_section(models, folder, zoom):
    m = model_picker(models, "interp_model")
    modes = ["Two points"] + (["Two classes, same noise"] if m.model.num_classes else [])
    remember("interp_mode", modes[0])
    if st.session_state["interp_mode"] not in modes:
        st.session_state["interp_mode"] = modes[0]
    mode = st.radio("Interpolate between", modes, key="interp_mode", horizontal=True, bind="query-params")
    c = st.columns(3)
    with c[0]:
        remember("interp_steps", 8)
        steps = st.slider("Steps", 2, 16, key="interp_steps", bind="query-params")
    with c[1]:
        temperature = temperature_slider("interp_temperature", "Temperature (samples)")
    spherical = False
    if mode == "Two points":  # a class blend keeps one noise vector: there is no path to bend
        with c[2]:
            remember("interp_slerp", True)
            spherical = st.checkbox("Spherical (slerp)", key="interp_slerp", bind="query-params",
                                    help="Follow the sphere |noise| ≈ const instead of the straight line, which "
                                         "passes near the centre where images wash out")
        ends = st.columns(2)
        with ends[0]:
            a = pick_point(m, folder, "a", "A is", temperature, 0)
        with ends[1]:
            b = pick_point(m, folder, "b", "B is", temperature, 1)
        if a is None or b is None:
            return
    else:
        a, b = class_ends(m, temperature)
    show_interpolation(m, a, b, steps, temperature, spherical, tile_px(zoom, m.model.image_size))


def show_interpolation(m, a, b, steps, temperature, spherical, px):
    """The path from a to b as a strip (with the real images at the ends) and as a GIF."""
    eps = interpolate(a.eps, b.eps, steps, spherical)
    weights = None
    if m.model.num_classes:  # the label travels with the noise: A's class at one end, B's at the other
        eye = torch.eye(m.model.num_classes)
        weights = interpolate(eye[a.k], eye[b.k], steps, spherical=False)
    frames = list(decode_noise(m.model, eps, weights).cpu())
    row = ([a.real] if a.real is not None else []) + frames + ([b.real] if b.real is not None else [])
    if torch.equal(a.eps, b.eps):
        how = "the same noise, only the class label moves"
    else:
        how = f"{'spherical' if spherical else 'straight'} in the prior's noise"
    ends = " The real images stand at both ends, beside their reconstructions." if len(row) > steps else ""
    st.caption(f"From {a.text} to {b.text}: {steps} steps, {how}.{ends}")
    name = interpolation_name(m, a, b, steps, temperature, spherical)
    left, right = st.columns([3, 1])
    with left:
        st.session_state["interp_strip"] = show_sheet([(None, row)], px, name, "download_interp",
                                                      width=PAGE_WIDTH * 3 // 4 - 16)
    with right:
        gif = gif_bytes(frames, min(2 * px, 256))
        st.image(gif, caption="The same path, there and back")
        st.download_button("GIF", gif, file_name=f"{name}.gif", mime="image/gif", key="download_gif",
                           on_click="ignore", icon=":material/download:")


def interpolation_name(m, a, b, steps, temperature, spherical):
    """File name (without extension) of an interpolation: what both ends are and how the path was drawn."""
    return (f"{slug(m.run)}_ep{m.meta['epoch']}_interp_{a.name}_to_{b.name}_{steps}steps_t{temperature:g}"
            + ("_slerp" if spherical else ""))


def class_ends(m, temperature):
    """Two points with the same noise and two classes: what the label alone changes."""
    names = m.classes
    c = st.columns(3)
    with c[0]:
        ka = names.index(choice("Class A", names, "class_a"))
    with c[1]:
        kb = names.index(choice("Class B", names, "class_b", default=names[min(1, len(names) - 1)]))
    with c[2]:
        seed = seed_input("Seed", "interp_seed")
    eps = grid_noise(1, m.model.latent_dim, seed, temperature)[0]
    return (Point(eps, ka, None, f"{names[ka]} (sample #0 of seed {seed})", f"seed{seed}-{slug(names[ka])}"),
            Point(eps, kb, None, names[kb], slug(names[kb])))

# ----------------------------------------------------------------------------------------------------
# the page


# when the browser scales a picture, no smoothing either; and fullscreen fills the screen (Streamlit's own
# fullscreen shows a picture no larger than it is, and ours are drawn at their size already)
PAGE_STYLE = """<style>
[data-testid="stImage"] img {image-rendering: pixelated;}
[data-testid="stImageContainer"]:has(img[style*="max-height"]) {width: 100%; height: 100%;}
[data-testid="stImageContainer"] img[style*="max-height"] {width: 100%; height: 100%;}
</style>"""


def path_field():
    st.sidebar.text_input("Open a checkpoint by path", key="typed_path", on_change=add_typed_checkpoint,
                          placeholder="~/runs/logs/demo/last.pt",
                          help="Any .pt file saved by run_vae.py; it is added to the table and opened")
    if st.session_state.get("typed_problem"):
        st.sidebar.error(st.session_state["typed_problem"])


def sidebar_details(models):
    for m in models:
        cfg, metrics = m.meta["config"], m.meta["metrics"]
        st.sidebar.subheader(m.label, divider="gray")
        st.sidebar.caption(f"`{shown_path(m.path)}` · {m.meta['kind']} checkpoint of run **{m.run}** · "
                           f"epoch {m.meta['epoch']}, step {m.meta['step']} · prior {m.meta['prior']}")
        what = (f"CVAE over {len(m.classes)} classes" if m.model.num_classes
                else f"unconditional VAE ({len(m.classes)} class folders in its data)")
        st.sidebar.markdown(f"{what}, latent dim {m.model.latent_dim}, {m.model.image_size}×{m.model.image_size} "
                            f"images. Classes: {', '.join(f'`{c}`' for c in m.classes)}")
        rows = [f"| {METRIC_NAMES.get(k, k)} | {metrics[k]:.4g} |" for k in metric_keys([{"metrics": metrics}])]
        if rows:
            st.sidebar.markdown("\n".join(["| metric | value |", "| --- | ---: |", *rows]))
        with st.sidebar.expander("Training config"):
            st.code(config_to_yaml(cfg), language="yaml")


def main():
    st.set_page_config(page_title="VAE explorer", layout="wide")  # no page_icon: a Material one is fetched from Google
    args, unknown, usage = parse_args(sys.argv[1:])
    keep_hidden_widgets()
    st.html(PAGE_STYLE)
    st.title("VAE explorer")
    if unknown:
        st.warning(f"Ignoring unknown arguments `{' '.join(unknown)}`. Usage: `{usage}`")
    path_field()
    chosen = choose_models(args)
    if not chosen:
        if st.session_state["table_paths"]:
            st.info("Tick a checkpoint in the table to open it; tick two or more to compare them.")
        return
    models = open_models(chosen)
    if not models:
        return
    reset_class_widgets(models)
    follow_data_folder(models[0])
    zoom = display_controls(models)
    sidebar_details(models)
    tabs = dict(zip(TABS, st.tabs(TABS, key="tab", bind="query-params")))
    if tabs["Samples"].open:
        with tabs["Samples"]:
            samples_section(models, zoom)
    if tabs["Reconstructions"].open:
        with tabs["Reconstructions"]:
            data_folder_field()
            folder = open_folder(models[0], args.cache_dir, warn=True)
            if folder is not None:
                reconstructions_section(models, folder, zoom)
    if tabs["Your pictures"].open:
        with tabs["Your pictures"]:
            pictures_section(models, zoom)
    for title, section in (("Latent space", latent_section), ("Interpolation", interpolation_section)):
        if tabs[title].open:
            with tabs[title]:
                section(models, open_folder(models[0], args.cache_dir, warn=False), zoom)


if __name__ == "__main__":
    main()
