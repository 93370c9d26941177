"""
A browser UI for trained (C)VAE checkpoints: pick a model, sample from the prior, look at
reconstructions and latent interpolations, download any grid as PNG.

    streamlit run ui.py                                      # every checkpoint under best_models/ and logs/*/
    streamlit run ui.py -- --checkpoint best_models/demo.pt  # open this one first (any path)
    streamlit run ui.py -- --best-dir runs/best --logs-dir runs/logs

No checkpoint yet? Train the demo model first: python run_vae.py --config config/train_demo.yaml
Checkpoints are read by run_vae.load_checkpoint (torch.load with weights_only=True), so opening a file
can never run code. .streamlit/config.toml keeps the server headless and usage statistics off.
"""
import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from PIL import Image

from run_vae import (DEFAULTS, CheckpointError, DataError, config_to_yaml, load_checkpoint,
                     load_image_folder, make_grid_image, model_from_checkpoint, pick_device, prior_description,
                     sample_grid, split_train_val, to_float)

TRAIN_COMMAND = "python run_vae.py --config config/train_demo.yaml"
TYPED_PATH = "\0typed"  # picker entry for a path typed by hand; no real path contains a NUL
DISPLAY_WIDTH = 640     # small images are scaled up (without smoothing) to about this width on screen
KEY_METRICS = {"fid": "FID", "val_neg_elbo": "validation −ELBO (nats)", "val_bits_per_dim": "validation bits/dim",
               "val_kl": "validation KL (nats)", "active_units": "active latent units"}
# widgets whose choices depend on the model (class names, data folder): reset when another model is opened
MODEL_WIDGETS = ("sample_class", "data_folder", "interp_class", "class_a", "class_b", "image_a", "image_b")

# ----------------------------------------------------------------------------------------------------
# command line and checkpoint discovery


def parse_args(argv):
    """Options after `--` on the streamlit command line. Unknown ones are returned, to be shown, not fatal."""
    p = argparse.ArgumentParser(prog="streamlit run ui.py --", add_help=False, exit_on_error=False)
    p.add_argument("--checkpoint", default="", help="open this checkpoint first")
    p.add_argument("--best-dir", default=DEFAULTS["run"]["best_dir"], help="folder of best checkpoints (*.pt)")
    p.add_argument("--logs-dir", default=DEFAULTS["run"]["log_dir"], help="folder of run folders (<run>/*.pt)")
    try:
        args, unknown = p.parse_known_args(argv)
    except argparse.ArgumentError as e:  # e.g. --checkpoint with no value: say so, run with the defaults
        args, unknown = p.parse_known_args([])[0], [str(e)]
    return args, unknown, p.format_usage().strip()


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


@st.cache_data(max_entries=500, show_spinner=False)
def checkpoint_summary(path, mtime):
    """What the picker says about a checkpoint. Reading it means loading it, so this is cached per (path, mtime)."""
    try:
        ckpt = load_checkpoint(path)
        return {"run": ckpt["config"]["run"]["name"], "kind": ckpt.get("kind", "?"), "epoch": ckpt["epoch"],
                "metrics": dict(ckpt["metrics"]), "classes": list(ckpt["classes"]),
                "conditional": bool(ckpt["config"]["model"]["conditional"]), "error": ""}
    except Exception as e:  # the picker only lists it; opening it shows the full message
        return {"error": str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"}


def shown_path(path):
    """Relative to the working directory when it is below it: shorter, and what the user typed."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def score_text(metrics):
    if "fid" in metrics:
        return f"FID {metrics['fid']:.1f}"
    if "val_neg_elbo" in metrics:
        return f"val −ELBO {metrics['val_neg_elbo']:.1f}"
    if "loss" in metrics:
        return f"loss {metrics['loss']:.1f}"
    return "no metrics"


def picker_label(path, mtime, summary):
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime / 1e9))
    if summary["error"]:
        return f"⚠ unreadable · {shown_path(path)} · {when}"
    kind = f"CVAE, {len(summary['classes'])} classes" if summary["conditional"] else "VAE"
    # most telling first: the sidebar cuts long labels, the open list shows them whole
    return (f"{summary['run']} · {summary['kind']} · epoch {summary['epoch']} · {score_text(summary['metrics'])}"
            f" · {kind} · {when} · {shown_path(path)}")

# ----------------------------------------------------------------------------------------------------
# model and data, loaded once


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def load_model(path, mtime):
    """The model in eval mode and the checkpoint's metadata, once per (path, modification time)."""
    ckpt = load_checkpoint(path)
    # channels_last: the transposed convolutions run about a third faster on the CPU, same results
    model = model_from_checkpoint(ckpt, pick_device("auto")).to(memory_format=torch.channels_last)
    meta = {k: ckpt[k] for k in ("config", "classes", "epoch", "step", "metrics")}
    meta["kind"] = ckpt.get("kind", "?")
    meta["prior"] = prior_description(ckpt)
    return model, meta


def folder_stamp(root):
    """Changes when a class folder is added, removed or has files added/removed: enough to reload the cache."""
    root = Path(root)
    if not root.is_dir():
        return None
    return tuple((p.name, p.stat().st_mtime_ns) for p in sorted([root, *root.iterdir()]) if p.is_dir())


@st.cache_resource(max_entries=2, show_spinner="Reading images…")
def load_images(root, image_size, cache_dir, stamp):
    return load_image_folder(root, image_size, cache_dir)


def device_of(model):
    return next(model.parameters()).device

# ----------------------------------------------------------------------------------------------------
# generation


def grid_columns(n):
    return max(1, math.ceil(math.sqrt(n)))


def prior_noise(n, latent_dim, seed, temperature=1.0):
    """The same draws as VAE.sample and sample_grid make for this seed, so every view agrees on what seed s
    means. Standard normal noise: VAE.prior_z maps it into the model's prior."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)) * temperature


@torch.no_grad()
def prior_samples(model, classes, n, seed, temperature, class_index=None):
    """n samples from the model's prior, its spread scaled by temperature -> (images, columns, row labels or None).

    For a CVAE, class_index None means one row per class with the same noise in every row, so only the class
    changes down a column; otherwise all n are of that class.
    """
    if model.num_classes and class_index is None:
        return sample_grid(model, classes, n, seed, temperature)
    y = torch.full((n,), class_index, dtype=torch.long) if model.num_classes else None
    images = model.sample(n, y, temperature, generator=torch.Generator().manual_seed(seed))
    return images, grid_columns(n), None


@torch.no_grad()
def decode(model, z, class_weights=None):
    """Decode z; for a CVAE with a blend of classes per row (rows of class_weights sum to 1)."""
    z = z.to(device_of(model))
    if class_weights is None:
        return model.decode(z)
    return model.decode(z, class_weights.float().to(device_of(model)))  # float rows: a blend of classes


@torch.no_grad()
def decode_noise(model, eps, class_weights=None):
    """Decode prior noise: through the model's prior (per class, blended with the label), then the decoder."""
    y = None if class_weights is None else class_weights.float().to(device_of(model))
    return decode(model, model.prior_z(eps.to(device_of(model)), y), class_weights)


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
    return x, mu, y


@torch.no_grad()
def reconstruct(model, images_uint8, labels):
    """Real images and their reconstructions from the posterior mean, interleaved: real, recon, real, ..."""
    x, mu, y = encode_mean(model, images_uint8, labels)
    return torch.stack([x, model.decode(mu, y)], 1).flatten(0, 1)

# ----------------------------------------------------------------------------------------------------
# page sections


def show_grid(images, nrow, labels, file_name, key):
    """Show a grid and offer it as a PNG. Small images are scaled up without smoothing so pixels stay sharp."""
    grid = make_grid_image(images, nrow, labels)
    shown = scaled_for_display(grid)
    png = png_bytes(grid)
    st.image(png_bytes(shown) if shown is not grid else png, output_format="PNG")  # bytes: no second encode
    st.download_button("Download PNG", png, file_name=file_name, mime="image/png", key=key,
                       on_click="ignore", icon=":material/download:")
    return np.asarray(grid)


def scaled_for_display(grid):
    """Small grids scaled up by a whole factor without smoothing, so every pixel stays a sharp square."""
    scale = max(1, min(8, DISPLAY_WIDTH // grid.width))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST) if scale > 1 else grid


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # the default level takes ~0.2 s for a 64-image grid
    return buf.getvalue()


def pick_checkpoint(args):
    """The sidebar picker. Returns the chosen path, or None when there is nothing to open yet."""
    found = find_checkpoints(args.best_dir, args.logs_dir)
    summaries = {path: (mtime, checkpoint_summary(path, mtime)) for path, mtime in found}
    options = [path for path, _ in found]
    cli_path = args.checkpoint
    if cli_path and not any(Path(cli_path).resolve() == Path(p).resolve() for p in options):
        options.insert(0, cli_path)
    default = next((i for i, p in enumerate(options) if cli_path and Path(p).resolve() == Path(cli_path).resolve()), 0)
    options.append(TYPED_PATH)

    def label(path):
        if path == TYPED_PATH:
            return "Another file… (type its path)"
        if path not in summaries:
            return f"{shown_path(path)} (from --checkpoint)"
        return picker_label(path, *summaries[path])

    st.sidebar.header("Model")
    if not found and not cli_path:
        st.info(f"No checkpoints under `{args.best_dir}/` or `{args.logs_dir}/*/` yet. Train one, then reload "
                f"this page:\n\n```bash\n{TRAIN_COMMAND}\n```\n\n(`make demo` does the same and then tests the model.) "
                f"Or type the path of a checkpoint in the sidebar.")
    where = f"{shown_path(args.best_dir)}/ and {shown_path(args.logs_dir)}/*/"
    choice = st.sidebar.selectbox(f"Checkpoints in {where}, newest first", options,
                                  index=default, format_func=label, key="checkpoint")
    if choice == TYPED_PATH:
        typed = st.sidebar.text_input("Checkpoint path", key="typed_path", placeholder="best_models/demo.pt")
        return typed.strip() or None
    return choice


def show_model_details(path, meta, model):
    cfg, metrics = meta["config"], meta["metrics"]
    st.sidebar.caption(f"`{shown_path(path)}` · {meta['kind']} checkpoint of run **{cfg['run']['name']}** · "
                       f"epoch {meta['epoch']}, step {meta['step']}")
    what = (f"CVAE over {len(meta['classes'])} classes" if model.num_classes
            else f"unconditional VAE ({len(meta['classes'])} class folders in its data)")
    st.sidebar.markdown(f"{what}, latent dim {model.latent_dim}, {model.image_size}×{model.image_size} images. "
                        f"Classes: {', '.join(f'`{c}`' for c in meta['classes'])}")
    rows = [f"| {name} | {metrics[k]:.4g} |" for k, name in KEY_METRICS.items() if k in metrics]
    if rows:
        st.sidebar.markdown("\n".join(["| metric | value |", "| --- | ---: |", *rows]))
    with st.sidebar.expander("All metrics"):
        st.json(metrics)
    with st.sidebar.expander("Training config"):
        st.code(config_to_yaml(cfg), language="yaml")


def class_picker(label, classes, key, with_all=False, index=0):
    """Class index, or None for 'every class' when with_all."""
    options = ([None] if with_all else []) + list(range(len(classes)))
    return st.selectbox(label, options, index=index, key=key,
                        format_func=lambda i: "every class, one row each" if i is None else classes[i])


@st.fragment  # a control here reruns only this section: the grid follows the sliders at once
def samples_section(model, meta):
    classes, run = meta["classes"], meta["config"]["run"]["name"]
    c = st.columns(4 if model.num_classes else 3)
    class_index = None
    if model.num_classes:
        with c[3]:
            class_index = class_picker("Class", classes, "sample_class", with_all=True)
    if model.num_classes and class_index is None:
        with c[0]:
            n = st.slider("Samples per class", 1, 32, 8, key="per_class")
    else:
        with c[0]:
            n = st.slider("Samples", 1, 256, 64, key="num_samples")
    with c[1]:
        seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="seed")
    with c[2]:
        temperature = st.slider("Temperature (scale of z's std)", 0.0, 2.0, 1.0, 0.05, key="temperature")
    images, nrow, labels = prior_samples(model, classes, n, int(seed), temperature, class_index)
    what = "all classes" if class_index is None else classes[class_index]
    st.caption(f"{len(images)} samples from the prior ({meta['prior']}), temperature {temperature:g}, seed {seed}"
               + (f", {what}" if model.num_classes else "") + ". The same seed always gives the same grid.")
    name = f"{run}_samples_seed{seed}_t{temperature:g}" + (f"_{what.replace(' ', '-')}" if model.num_classes else "")
    # kept so tests (and anyone scripting the app) can read exactly the pixels on screen
    st.session_state["samples_grid"] = show_grid(images, nrow, labels, f"{name}.png", "download_samples")


def images_for_model(data, model, model_classes):
    """(images, labels in the model's class numbering, files) of a folder; classes the model lacks are left out."""
    if not model.num_classes or data.classes == model_classes:
        return data.images, data.labels, data.files
    index = {name: i for i, name in enumerate(model_classes)}
    mapping = torch.tensor([index.get(name, -1) for name in data.classes])
    labels = mapping[data.labels]
    keep = (labels >= 0).nonzero().flatten()
    unknown = [name for name in data.classes if name not in index]
    if unknown:
        st.warning(f"The model was not trained on class(es) {', '.join(unknown)}; their images are left out.")
    return data.images[keep], labels[keep], [data.files[i] for i in keep]


def choose_folder(model, meta):
    """The data folder for reconstructions and interpolation between real images, with its images in the
    model's class numbering: a dict, or None when it can't be used (a warning says why)."""
    cfg = meta["config"]
    root = st.text_input("Data folder (one sub-folder per class)", cfg["data"]["root"], key="data_folder").strip()
    cache_dir = cfg["data"]["cache_dir"] if Path(cfg["data"]["cache_dir"]).is_dir() else None
    try:
        data = load_images(root, model.image_size, cache_dir, folder_stamp(root))
    except (DataError, OSError) as e:
        st.warning(str(e))
        return None
    images, labels, files = images_for_model(data, model, meta["classes"])
    if not len(images):
        st.warning(f"No images in {root} belong to a class this model knows ({', '.join(meta['classes'])}).")
        return None
    validation = None
    same_data = Path(root).resolve() == Path(cfg["data"]["root"]).resolve() and len(images) == len(data)
    if same_data and cfg["data"]["val_fraction"] > 0:  # the split training made: same folder, fraction and seed
        validation = split_train_val(len(images), cfg["data"]["val_fraction"], cfg["run"]["seed"])[1]
    return {"root": root, "images": images, "labels": labels, "files": files, "validation": validation}


@st.fragment  # a control here reruns only this section
def reconstructions_section(model, meta, folder):
    c = st.columns(3)
    with c[0]:
        k = st.slider("Images", 1, 32, 16, key="num_recon")
    with c[1]:
        pick_seed = int(st.number_input("Pick seed", 0, 2**31 - 1, 0, key="recon_seed"))
    candidates, which = torch.arange(len(folder["images"])), "images"
    if folder["validation"] is not None:
        with c[2]:
            if st.checkbox("Only validation images (never trained on)", True, key="held_out"):
                candidates, which = folder["validation"], "validation images"
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(pick_seed))
    chosen = candidates[order[:k]]
    pairs = reconstruct(model, folder["images"][chosen], folder["labels"][chosen])
    mse = (pairs[0::2] - pairs[1::2]).pow(2).mean().item()
    st.caption(f"{len(chosen)} random of the {len(candidates)} {which} in `{shown_path(folder['root'])}`, each "
               f"followed by its reconstruction (decoded posterior mean). Mean squared error per pixel: {mse:.4f}.")
    show_grid(pairs, 8 if len(chosen) >= 4 else 2 * len(chosen), None,
              f"{meta['config']['run']['name']}_reconstructions_seed{pick_seed}.png", "download_recon")


@st.fragment
def interpolation_section(model, meta, folder):
    classes, run = meta["classes"], meta["config"]["run"]["name"]
    modes = ["Two seeds", "Two images"] + (["Two classes, same z"] if model.num_classes else [])
    mode = st.radio("Between", modes, horizontal=True, key="interp_mode")
    c = st.columns(4)
    with c[0]:
        steps = st.slider("Steps", 2, 16, 8, key="interp_steps")
    with c[1]:
        spherical = st.checkbox("Spherical (slerp)", True, key="interp_slerp",
                                help="Follow the sphere |z| ≈ const instead of the straight line, which passes "
                                     "near z = 0 where images wash out")
    one_hot = torch.eye(max(1, model.num_classes))
    if mode == "Two images":
        if folder is None:
            st.info("Choose a data folder with images in the Reconstructions tab first.")
            return
        images, labels, files = folder["images"], folder["labels"], folder["files"]
        with c[2]:
            a = int(st.number_input(f"Image A (0–{len(images) - 1})", 0, len(images) - 1, 0, key="image_a"))
        with c[3]:
            b = int(st.number_input(f"Image B (0–{len(images) - 1})", 0, len(images) - 1, len(images) - 1,
                                    key="image_b"))
        x, mu, _ = encode_mean(model, images[[a, b]], labels[[a, b]])
        z = interpolate(mu[0].cpu(), mu[1].cpu(), steps, spherical)
        if model.num_classes:  # the label travels with z: A's class at one end, B's at the other
            decoded = decode(model, z, interpolate(one_hot[labels[a]], one_hot[labels[b]], steps, spherical=False))
        else:
            decoded = decode(model, z)
        row = torch.cat([x[:1], decoded, x[1:]])
        caption = (f"`{files[a]}` → `{files[b]}`: the real images at both ends, between them {steps} decoded points "
                   f"from one posterior mean to the other.")
        name = f"{run}_interp_images_{a}_{b}"
    elif mode == "Two seeds":
        with c[2]:
            seed_a = int(st.number_input("Seed A", 0, 2**31 - 1, 0, key="seed_a"))
        with c[3]:
            seed_b = int(st.number_input("Seed B", 0, 2**31 - 1, 1, key="seed_b"))
        d = st.columns(2)
        with d[0]:
            temperature = st.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="interp_temperature")
        eps = interpolate(prior_noise(1, model.latent_dim, seed_a, temperature)[0],
                          prior_noise(1, model.latent_dim, seed_b, temperature)[0], steps, spherical)
        if model.num_classes:
            with d[1]:
                k = class_picker("Class", classes, "interp_class")
            row = decode_noise(model, eps, one_hot[[k] * steps])
        else:
            row = decode_noise(model, eps)
        caption = f"From the first sample of seed {seed_a} to the first sample of seed {seed_b}, {steps} steps."
        name = f"{run}_interp_seeds_{seed_a}_{seed_b}"
    else:
        with c[2]:
            ka = class_picker("Class A", classes, "class_a")
        with c[3]:
            kb = class_picker("Class B", classes, "class_b", index=min(1, len(classes) - 1))
        d = st.columns(2)
        with d[0]:
            seed = int(st.number_input("Seed", 0, 2**31 - 1, 0, key="interp_seed"))
        with d[1]:
            temperature = st.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="interp_class_temperature")
        eps = prior_noise(1, model.latent_dim, seed, temperature).repeat(steps, 1)
        row = decode_noise(model, eps, interpolate(one_hot[ka], one_hot[kb], steps, spherical=False))
        caption = f"One z (first sample of seed {seed}), class blended from {classes[ka]} to {classes[kb]}."
        name = f"{run}_interp_classes_{classes[ka]}_{classes[kb]}_seed{seed}"
    st.caption(caption)
    show_grid(row, len(row), None, f"{name}.png", "download_interp")


def main():
    st.set_page_config(page_title="VAE explorer", layout="wide")  # no page_icon: a Material one is fetched from Google
    args, unknown, usage = parse_args(sys.argv[1:])
    st.title("VAE explorer")
    if unknown:
        st.warning(f"Ignoring unknown arguments {' '.join(unknown)}. Usage: `{usage}`")
    path = pick_checkpoint(args)
    if path is None:
        return
    mtime = modification_time(path)
    try:
        model, meta = load_model(str(path), mtime)
    except CheckpointError as e:
        st.error(str(e))
        return
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # tagged as ours, but not what this version reads
        st.error(f"{path} cannot be used: {type(e).__name__}: {e}")
        return
    opened = (str(path), tuple(meta["classes"]), meta["config"]["data"]["root"])
    if st.session_state.get("opened") != opened:  # a new model, not just a newer save of the same run
        for key in MODEL_WIDGETS:
            st.session_state.pop(key, None)
        st.session_state["opened"] = opened
    show_model_details(path, meta, model)
    samples, recon, interp = st.tabs(["Samples", "Reconstructions", "Interpolation"])
    with samples:
        samples_section(model, meta)
    with recon:
        folder = choose_folder(model, meta)  # outside the fragments: a new folder updates both tabs that use it
        if folder is not None:
            reconstructions_section(model, meta, folder)
    with interp:
        interpolation_section(model, meta, folder)


if __name__ == "__main__":
    main()
