"""
Training speed of run_vae.train, end to end, against the FLOP ceiling and a plain ImageFolder loop.

    python bench/bench_train.py                  # ~8 min on 2 cores: 2 interleaved rounds, all apples
    python bench/bench_train.py --quick          # ~2 min: 960 of the images
    python bench/bench_train.py --json           # last line: one JSON object with the figures
    python bench/bench_train.py --quick --threads=1   # steadier ratios while other jobs share the CPU
    python bench/bench_train.py --data=my_images --image_size=128 --rounds=3
    python bench/bench_train.py --recipes             # ~1 min: a step with each loss recipe and the resize decoder
    python bench/bench_train.py --quick --data_paths  # batches from host memory and from a memmap vs on the device
    python bench/bench_train.py --quick --ddp 1,2     # torchrun with 1 and 2 processes: scaling, all-reduce per step

Data: ../shared/data/apples when present, else generated JPEG fruit (run_vae's demo renderer).
Config: 64x64, latent 128 (run_vae's defaults) at batch 64 and Adam 1e-3, the reference setting of the
speed figures (training itself defaults to batch 4); FID off, everything in a temp dir.

Every training run is a fresh process started the way a user starts one, so its start-up (imports,
decoded-data cache hit, model build) is real and its peak RSS is its own. Other jobs on the machine
change absolute speeds from minute to minute, so the variants are interleaved round by round (order
reversed every other round), the matmul ceiling is measured right before and after each run, and
every figure we care about is a ratio within one round (median over rounds).

--data_paths and --ddp measure other questions, in place of the figures above. --data_paths: the same
training with its batches read from the device, from host memory (data.device_budget=0) and from the
memory-mapped cache (data.host_budget=0, built and read once beforehand: a warm page cache). --ddp N,M:
the same training under `torchrun --standalone --nproc_per_node=N` (train.batch_size the global batch),
with a DDP communication hook timing each gradient all-reduce, and the BatchNorm syncs timed apart.
"""
import argparse
import atexit
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_vae  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "apples"

# ----------------------------------------------------------------------------------------------------
# data


def subset_folder(src, dst, per_class):
    """Symlinks to the first `per_class` images of each class: a smaller copy of the same JPEGs."""
    classes, files = run_vae.list_image_folder(src)
    taken = {}
    for rel, label in files:
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            (dst / Path(rel).parent).mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(Path(src).resolve() / rel)
    return dst


def generated_folder(dst, per_class, seed=0):
    """run_vae's demo fruit saved as 100x100 JPEGs, so the baseline decodes what it would on apples."""
    for k, (name, colours) in enumerate(run_vae.DEMO_CLASSES.items()):
        (dst / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = run_vae.render_demo_fruit(np.random.default_rng([seed, k, i]), colours)
            img.save(dst / name / f"{i:04d}.jpg", quality=90)
    return dst

# ----------------------------------------------------------------------------------------------------
# ceiling


def matmul_gflops(dtype, device, n, reps=5):
    """Median GFLOP/s of an n x n matmul: what the BLAS reaches on this machine at this minute."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def gflop_per_image(cfg):
    """Forward + backward FLOPs of one training step, counted by PyTorch, per image."""
    from torch.utils.flop_counter import FlopCounterMode
    model = run_vae.build_model(cfg, 3)
    bs, size = cfg["train"]["batch_size"], cfg["data"]["image_size"]
    x, y = torch.rand(bs, 3, size, size), torch.zeros(bs, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        recon, kl, _ = run_vae.vae_loss(x, *model(x, y))
        (recon + kl).backward()
    return counter.get_total_flops() / bs / 1e9

# ----------------------------------------------------------------------------------------------------
# the measured runs; each runs in its own process (see --child)


def peak_rss_mib(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def child_trainer(job, started):
    """One run_vae.train() call. train() reports the seconds of each of its parts (validation, grids,
    checkpoints, FID, prior fits); the only seam wrapped from outside is run_vae.train_step, for the time
    of the first step and the loss of every step (kept on the device: no host sync)."""
    t_imported = time.time()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    first_step, losses = [], []
    train_step = run_vae.train_step

    def recording_step(run, x, y, beta):
        if not first_step:
            first_step.append(time.time())
        out = train_step(run, x, y, beta)
        losses.append(out[0][1] + out[0][2])  # recon + KL: comparable across beta schedules
        return out

    run_vae.train_step = recording_step
    comm = watch_communication() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if comm is not None:
        run_vae.train_step = comm["step"](recording_step)
    load_data = time.perf_counter()
    cfg = run_vae.load_config(None, job["config"])
    run_vae.load_data(cfg)  # a cache hit: what every run after the first pays for its data
    load_data_s = time.perf_counter() - load_data
    summary = run_vae.train(cfg)
    done = time.time()
    tm, bs = summary["timings"], cfg["train"]["batch_size"]
    epoch_end = {k: tm[k] for k in ("validation", "grids", "checkpoints", "fid")}
    # like start-up, the prior fit is paid once a run (FID off), not once an epoch: reported on its own
    loop_s = done - first_step[0] - tm["prior_fit"]
    return {"start_s": first_step[0] - started, "import_s": t_imported - started,
            "load_data_s": load_data_s, "steps": len(losses), "loop_s": loop_s, "run_end_s": tm["prior_fit"],
            "fits": tm["prior_fits"], "epoch_end_s": sum(epoch_end.values()), "epoch_end_parts": epoch_end,
            "images_per_s": len(losses) * bs / loop_s,
            "step_images_per_s": len(losses) * bs / (loop_s - sum(epoch_end.values())),
            "losses": torch.stack(losses).float().tolist(), "peak_rss_mib": peak_rss_mib(),
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "allreduce_s_per_step": statistics.median(comm["allreduce"]) if comm else 0.0,
            "bn_sync_s_per_step": statistics.median(comm["bn_sync"]) if comm else 0.0,
            "step_s": statistics.median(comm["step_s"]) if comm else None}


def union_length(intervals):
    """Seconds covered by a set of (start, end) intervals: overlapping all-reduces count once."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def watch_communication():
    """Per training step of a torchrun worker: the wall time the gradient all-reduces were running (a DDP
    communication hook around PyTorch's own all-reduce hook; the buckets overlap the backward pass and
    each other), the time spent syncing BatchNorm statistics, and the step's own time."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    found = {"allreduce": [], "bn_sync": [], "step_s": []}
    intervals, bn, hooked = [], [0.0], []

    def hook(state, bucket):
        start = time.perf_counter()

        def done(fut):
            intervals.append((start, time.perf_counter()))
            return fut.value()
        return allreduce_hook(state, bucket).then(done)

    sync = run_vae.AllReduceSum

    class TimedSync(sync):
        @staticmethod
        def forward(ctx, x):
            start = time.perf_counter()
            out = sync.forward(ctx, x)
            bn[0] += time.perf_counter() - start
            return out

        @staticmethod
        def backward(ctx, grad):
            start = time.perf_counter()
            out = sync.backward(ctx, grad)
            bn[0] += time.perf_counter() - start
            return out
    run_vae.AllReduceSum = TimedSync

    def step(inner):
        def timed_step(run, *args):
            if not hooked:  # before the first backward pass, as DDP requires
                run.train_model.register_comm_hook(None, hook)
                hooked.append(True)
            intervals.clear()
            bn[0] = 0.0
            start = time.perf_counter()
            out = inner(run, *args)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            found["step_s"].append(time.perf_counter() - start)
            found["allreduce"].append(union_length(intervals))
            found["bn_sync"].append(bn[0])
            return out
        return timed_step
    found["step"] = step
    return found


def child_baseline(job, started):
    """How most repos train: ImageFolder + transforms + DataLoader decoding JPEGs every epoch, fp32,
    loss.item() every step. Same model, loss and optimizer as run_vae."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    cfg = run_vae.load_config(None, job["config"])
    size, bs, t = cfg["data"]["image_size"], cfg["train"]["batch_size"], cfg["train"]
    torch.manual_seed(cfg["run"]["seed"])
    device = run_vae.pick_device(cfg["run"]["device"])
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    data = datasets.ImageFolder(cfg["data"]["root"], tf)
    loader = DataLoader(data, batch_size=bs, shuffle=True, num_workers=job["workers"], drop_last=True,
                        pin_memory=device.type == "cuda")
    model = run_vae.build_model(cfg, len(data.classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t["lr"])
    losses, first = [], time.time()
    for _ in range(t["epochs"]):  # the clock includes worker start-up and decoding: users wait for both
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            recon, kl, _ = run_vae.vae_loss(x, *model(x, y))
            loss = recon + t["beta"] * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    loop_s = time.time() - first
    return {"start_s": first - started, "steps": len(losses), "loop_s": loop_s, "epoch_end_s": 0.0, "run_end_s": 0.0,
            "images_per_s": len(losses) * bs / loop_s, "step_images_per_s": len(losses) * bs / loop_s,
            "losses": losses, "peak_rss_mib": peak_rss_mib(),
            "workers_peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN)}


def run_child(kind, job, workdir, processes=0):
    """Start a fresh interpreter for one measured run; its clock starts when we launch it. processes > 0:
    under `torchrun --standalone --nproc_per_node=processes`, rank 0 reporting."""
    name = f"{kind}_{job['tag']}"
    job_file, out_file, log_file = (workdir / f"{name}.{ext}" for ext in ("job.json", "out.json", "log"))
    job_file.write_text(json.dumps(job))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    started = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, *launcher, __file__, "--child", kind, str(job_file), str(out_file),
                               repr(started)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{log_file.read_text()[-3000:]}")
    return json.loads(out_file.read_text())

# ----------------------------------------------------------------------------------------------------
# loss curves


def smooth(values, window):
    v = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(window) / window, mode="valid")


def rel_diffs(a, b, window):
    """|a - b| / b of the two loss curves after a moving average, step by step."""
    n = min(len(a), len(b))
    sa, sb = smooth(a[:n], window), smooth(b[:n], window)
    return np.abs(sa - sb) / np.abs(sb)


def max_rel_diff(a, b, window):
    d = rel_diffs(a, b, window)
    return float(d.max()) if len(d) else float("nan")


def median_rel_diff(a, b, window):
    """Typical gap between the curves; unlike the max, one loss spike in one run does not decide it."""
    d = rel_diffs(a, b, window)
    return float(np.median(d)) if len(d) else float("nan")


def end_rel_diff(a, b, window):
    """Relative difference of the mean loss over the last quarter of the steps: where training got to."""
    n = min(len(a), len(b))
    k = max(1, n // 4)
    return float(abs(np.mean(a[n - k:n]) - np.mean(b[n - k:n])) / np.mean(b[n - k:n]))


def minibatch_noise(losses, window):
    """Median relative scatter of single-step losses around their moving average."""
    s = smooth(losses, window)
    raw = np.asarray(losses[window // 2: window // 2 + len(s)])
    return float(np.median(np.abs(raw - s) / s)) if len(s) else float("nan")

# ----------------------------------------------------------------------------------------------------
# the benchmark


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def data_folder(args, workdir):
    """The benchmark's image folder and a note saying what it is."""
    src = Path(args.data)
    if src.is_dir():
        data_root = subset_folder(src, workdir / "data", args.subset) if args.subset else src
        return data_root, f"{src}" + (f" (first {args.subset} per class)" if args.subset else "")
    return (generated_folder(workdir / "generated", args.subset or 300),
            f"generated JPEG fruit ({args.subset or 300} per class; {src} not found)")


def config_maker(args, workdir, data_root):
    def config(name, precision, seed, epochs=args.epochs, data=None):
        return {"run": {"name": name, "seed": seed, "device": args.device, "log_dir": str(workdir / "logs"),
                        "best_dir": str(workdir / "best")},
                "data": {"root": str(data_root), "image_size": args.image_size, "cache_dir": str(workdir / "cache"),
                         **(data or {})},
                "model": {"latent_dim": args.latent_dim},
                "train": {"epochs": epochs, "batch_size": args.batch_size, "lr": 1e-3, "precision": precision},
                "fid": {"enabled": False}}
    return config


def bench(args):
    load_before = os.getloadavg()
    workdir, device, auto, config, cfg, data_note, n_images, cold_decode_s = setup(args)
    half = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    gflop = gflop_per_image(cfg)
    log(args, f"data: {data_note}, {n_images} images, decoded and cached in {cold_decode_s:.1f} s; "
              f"{gflop:.3f} GFLOP per training image; load average {load_before[0]:.1f}")

    variants = ["fp32", half] + ([auto] if auto not in ("fp32", half) else [])
    variants += [f"baseline_w{w}" for w in args.baseline_workers]
    rounds = measure_rounds(args, variants, half, config, workdir, device)
    fig = summarise(args, rounds, half, auto, gflop)
    fig["cold_decode_s"] = cold_decode_s
    fig.update(auto_precision=auto, device=str(device), threads=torch.get_num_threads(), data=data_note, images=n_images,
               image_size=args.image_size, batch_size=args.batch_size, latent_dim=args.latent_dim,
               epochs=args.epochs, rounds=args.rounds, baseline=f"baseline_w{args.baseline_workers[0]}",
               load_average=[round(load_before[0], 2), round(os.getloadavg()[0], 2)])
    report(args, fig, half, auto, fig["baseline"])
    return fig


def measure_rounds(args, variants, half, config, workdir, device):
    """Each variant trained once per round, in a child process, with the matmul speed measured around it."""
    half_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[half]

    def matmul_speeds():
        return {"fp32": matmul_gflops(torch.float32, device, args.matmul_n),
                half: matmul_gflops(half_dtype, device, args.matmul_n)}

    rounds = []
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # drift over time hits both ends equally
        res = {}
        mm = matmul_speeds()
        for v in order:
            if v.startswith("baseline_w") and r > 0 and v != f"baseline_w{args.baseline_workers[0]}":
                continue  # the secondary baseline setting is a note: one round of it is enough
            job = {"tag": f"{v}_r{r}", "config": config(f"{v}_r{r}", "fp32" if v.startswith("baseline") else v, r),
                   "threads": args.threads}
            if v.startswith("baseline_w"):
                job["workers"] = int(v[len("baseline_w"):])
                out = run_child("baseline", job, workdir)
            else:
                out = run_child("trainer", job, workdir)
            after = matmul_speeds()
            out["matmul_gflops"] = {k: (mm[k] + after[k]) / 2 for k in mm}
            mm = after
            res[v] = out
            log(args, f"round {r + 1}/{args.rounds} {v:>12}: {out['images_per_s']:6.1f} img/s end to end, "
                      f"first step after {out['start_s']:.2f} s, peak RSS {out['peak_rss_mib']:.0f} MiB, "
                      f"matmul fp32 {out['matmul_gflops']['fp32']:.0f} GFLOP/s")
        rounds.append(res)
    return rounds


def summarise(args, rounds, half, auto, gflop):
    """The figures bench prints: medians over rounds of speeds, ceilings, start-up and loss agreement."""
    base = f"baseline_w{args.baseline_workers[0]}"

    def per_round(fn):
        return median([fn(res) for res in rounds])

    def ceiling(res, v, dtype):
        return res[v]["matmul_gflops"][dtype] / gflop

    fig = {
        "images_per_s": per_round(lambda res: res[auto]["images_per_s"]),
        "images_per_s_fp32": per_round(lambda res: res["fp32"]["images_per_s"]),
        f"images_per_s_{half}": per_round(lambda res: res[half]["images_per_s"]),
        "step_images_per_s_fp32": per_round(lambda res: res["fp32"]["step_images_per_s"]),
        f"step_images_per_s_{half}": per_round(lambda res: res[half]["step_images_per_s"]),
        "ceiling_images_per_s_fp32": per_round(lambda res: ceiling(res, "fp32", "fp32")),
        f"ceiling_images_per_s_{half}": per_round(lambda res: ceiling(res, half, half)),
        "ceiling_fraction": per_round(lambda res: res["fp32"]["images_per_s"] / ceiling(res, "fp32", "fp32")),
        f"ceiling_fraction_{half}": per_round(lambda res: res[half]["images_per_s"] / ceiling(res, half, half)),
        # "end to end" of the data, step and logging alone: the loop without validation, grids, checkpoints
        "ceiling_fraction_steps": per_round(
            lambda res: res["fp32"]["step_images_per_s"] / ceiling(res, "fp32", "fp32")),
        f"{half}_speedup": per_round(lambda res: res[half]["images_per_s"] / res["fp32"]["images_per_s"]),
        "vs_baseline": per_round(lambda res: res[auto]["images_per_s"] / res[base]["images_per_s"]),
        "baseline_images_per_s": per_round(lambda res: res[base]["images_per_s"]),
        "second_start_s": median([res[v]["start_s"] for res in rounds for v in res if not v.startswith("baseline")]),
        "second_start_import_s": median([res[v]["import_s"] for res in rounds for v in res if "import_s" in res[v]]),
        "second_start_load_data_s": median([res[v]["load_data_s"] for res in rounds for v in res if "load_data_s" in res[v]]),
        "epoch_end_fraction": per_round(lambda res: res[auto]["epoch_end_s"] / res[auto]["loop_s"]),
        "images_per_s_with_start": per_round(lambda res: res[auto]["steps"] * args.batch_size / (
            res[auto]["loop_s"] + res[auto]["start_s"] + res[auto]["run_end_s"])),
        "run_end_s": per_round(lambda res: res[auto]["run_end_s"]),
        "run_end_s_fp32": per_round(lambda res: res["fp32"]["run_end_s"]),
        "prior_fits_per_run": max(res[v]["fits"] for res in rounds for v in res if not v.startswith("baseline")),
        "epoch_end_s": per_round(lambda res: res[auto]["epoch_end_s"] / args.epochs),
        "peak_rss_mib": max(res[v]["peak_rss_mib"] for res in rounds for v in res if not v.startswith("baseline")),
        "baseline_peak_rss_mib": max(res[v]["peak_rss_mib"] for res in rounds for v in res if v.startswith("baseline")),
        "gflop_per_image": gflop,
        "matmul_gflops_fp32": per_round(lambda res: res["fp32"]["matmul_gflops"]["fp32"]),
        f"matmul_gflops_{half}": per_round(lambda res: res[half]["matmul_gflops"][half]),
    }
    for w in args.baseline_workers[1:]:
        v = f"baseline_w{w}"
        fig[f"vs_baseline_w{w}"] = rounds[0][auto]["images_per_s"] / rounds[0][v]["images_per_s"]
    # loss of the half-precision run against fp32 from the same seed, beside the spread fp32 shows
    # between two seeds (needs 2 rounds) and from one minibatch to the next
    window = max(2, min(10, rounds[0]["fp32"]["steps"] // 4))
    for name, fn in (("", max_rel_diff), ("_median", median_rel_diff), ("_end", end_rel_diff)):
        fig[f"loss_{half}_vs_fp32{name}"] = max(fn(res[half]["losses"], res["fp32"]["losses"], window)
                                                for res in rounds)
        if len(rounds) > 1:
            fig[f"loss_fp32_seed_noise{name}"] = fn(rounds[1]["fp32"]["losses"], rounds[0]["fp32"]["losses"], window)
    fig["loss_minibatch_noise"] = minibatch_noise(rounds[0]["fp32"]["losses"], window)
    fig["loss_window"] = window
    parts = rounds[0][auto]["epoch_end_parts"]
    fig["epoch_end_parts_s"] = {k: round(v / args.epochs, 3) for k, v in parts.items()
                                if k not in ("load_data", "fit_prior")}
    return fig


def setup(args):
    """Work folder, device, the precision `auto` picks there, and the data (decoded once into the cache,
    timed: the first run's decode)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # its checkpoints and cache run to hundreds of MB
    if args.threads:
        torch.set_num_threads(args.threads)
    device = run_vae.pick_device(args.device)
    auto = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run_vae.pick_precision("auto", device)]
    data_root, data_note = data_folder(args, workdir)
    config = config_maker(args, workdir, data_root)
    cfg = run_vae.load_config(None, config("flops", "fp32", 0))
    t = time.perf_counter()
    n_images = len(run_vae.load_image_folder(cfg["data"]["root"], args.image_size, cfg["data"]["cache_dir"]))
    cold_decode_s = time.perf_counter() - t  # fills the cache: every measured run after it is a "second run"
    return workdir, device, auto, config, cfg, data_note, n_images, cold_decode_s


def interleaved(args, variants, run_one):
    """Each round runs every variant once, in reversed order every other round; {variant: result} per round."""
    rounds = []
    for r in range(args.rounds):
        res = {}
        for v in (variants if r % 2 == 0 else variants[::-1]):
            res[v] = run_one(v, r)
            log(args, f"round {r + 1}/{args.rounds} {v:>10}: {res[v]['images_per_s']:6.1f} img/s end to end, "
                      f"{res[v]['step_images_per_s']:6.1f} in the step loop")
        rounds.append(res)
    return rounds


def bench_data_paths(args):
    """Throughput with batches read from host memory and from the warm memmap, against the device path."""
    workdir, device, auto, config, cfg, data_note, n_images, _ = setup(args)
    t = time.perf_counter()
    mapped = run_vae.load_image_folder(cfg["data"]["root"], args.image_size, cfg["data"]["cache_dir"], max_bytes=0)
    mapped.images[:]  # one full read: the page cache is warm, as after a first epoch
    build_s = time.perf_counter() - t
    budgets = {"device": {}, "host": {"device_budget": "0"}, "memmap": {"host_budget": "0"}}

    def run_one(v, r):
        job = {"tag": f"{v}_r{r}", "config": config(f"{v}_r{r}", auto, 0, data=budgets[v]), "threads": args.threads}
        return run_child("trainer", job, workdir)
    rounds = interleaved(args, list(budgets), run_one)

    def per_round(fn):
        return median([fn(res) for res in rounds])
    fig = {f"{key}_{v}": per_round(lambda res: res[v][key]) for v in budgets
           for key in ("images_per_s", "step_images_per_s")}
    for v in ("host", "memmap"):
        fig[f"{v}_vs_device"] = per_round(lambda res: res[v]["images_per_s"] / res["device"]["images_per_s"])
        fig[f"{v}_vs_device_steps"] = per_round(
            lambda res: res[v]["step_images_per_s"] / res["device"]["step_images_per_s"])
    fig.update(memmap_build_s=build_s, memmap_mib=mapped.nbytes / 2 ** 20, precision=auto, device=str(device),
               images=n_images, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
               rounds=args.rounds, threads=torch.get_num_threads(), data=data_note)
    log(args, "\n".join([
        "",
        f"{device}, precision {auto}, {n_images} images {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) per run, {args.rounds} round(s); memmap cache {fig['memmap_mib']:.1f} MiB, "
        f"built and read once in {build_s:.1f} s (warm page cache)",
        *(f"{v:>7}: {fig[f'images_per_s_{v}']:7.1f} img/s end to end, {fig[f'step_images_per_s_{v}']:7.1f} in the "
          f"step loop" + ("" if v == "device" else f" = {fig[f'{v}_vs_device']:.0%} of the device path "
                          f"({fig[f'{v}_vs_device_steps']:.0%} in the step loop; target >= 90 %)") for v in budgets)]))
    return fig


def bench_ddp(args, processes):
    """The same training under torchrun with each number of processes: images/s, and per step the time
    gradient all-reduces run and the time BatchNorm statistics take to sync."""
    workdir, device, auto, config, cfg, data_note, n_images, _ = setup(args)

    def run_one(v, r):
        n = int(v.split("x")[0])
        job = {"tag": f"{v}_r{r}", "config": config(f"{v}_r{r}", auto, 0), "threads": args.threads}
        return run_child("trainer", job, workdir, processes=n)
    names = [f"{n}x" for n in processes]
    rounds = interleaved(args, names, run_one)

    def per_round(fn):
        return median([fn(res) for res in rounds])
    fig = {}
    for n, v in zip(processes, names):
        fig[f"images_per_s_{v}"] = per_round(lambda res: res[v]["images_per_s"])
        fig[f"step_images_per_s_{v}"] = per_round(lambda res: res[v]["step_images_per_s"])
        if n > 1:
            fig[f"allreduce_s_per_step_{v}"] = per_round(lambda res: res[v]["allreduce_s_per_step"])
            fig[f"bn_sync_s_per_step_{v}"] = per_round(lambda res: res[v]["bn_sync_s_per_step"])
            fig[f"step_s_{v}"] = per_round(lambda res: res[v]["step_s"])
            fig[f"allreduce_fraction_{v}"] = fig[f"allreduce_s_per_step_{v}"] / fig[f"step_s_{v}"]
        if processes[0] != n:
            fig[f"speedup_{v}"] = per_round(lambda res: res[v]["step_images_per_s"] / res[names[0]]["step_images_per_s"])
            fig[f"efficiency_{v}"] = fig[f"speedup_{v}"] / (n / processes[0])
    fig.update(processes=processes, precision=auto, device=str(device), images=n_images, image_size=args.image_size,
               batch_size=args.batch_size, epochs=args.epochs, rounds=args.rounds, threads_per_process=args.threads,
               data=data_note, load_average=round(os.getloadavg()[0], 2))
    lines = ["", f"{device}, precision {auto}, {n_images} images {args.image_size}x{args.image_size}, global batch "
                 f"{args.batch_size}, {args.threads or 'default'} thread(s) per process, load average "
                 f"{fig['load_average']}"]
    for n, v in zip(processes, names):
        line = f"{n} process(es): {fig[f'step_images_per_s_{v}']:7.1f} img/s in the step loop"
        if f"speedup_{v}" in fig:
            line += f", {fig[f'speedup_{v}']:.2f}x {processes[0]} ({fig[f'efficiency_{v}']:.0%} efficiency)"
        if n > 1:
            line += (f"; per step {fig[f'step_s_{v}'] * 1e3:.0f} ms, gradient all-reduce running "
                     f"{fig[f'allreduce_s_per_step_{v}'] * 1e3:.1f} ms ({fig[f'allreduce_fraction_{v}']:.0%}, overlapping "
                     f"the backward pass), BatchNorm sync {fig[f'bn_sync_s_per_step_{v}'] * 1e3:.1f} ms")
        lines.append(line)
    log(args, "\n".join(lines))
    return fig


# (loss section, model section) of each measured step: the loss recipes with the default decoder, the
# resize decoder (model.upsample) plain and under the adversarial term, and the variants of the adversarial
# term with prior samples judged too (decoders included) of docs/results.md "Sharp samples", and the
# conditional resize recipe with the projection discriminator and its class head (4 classes), also with
# the head's inputs hue-turned (its own trunk passes), and the noise recipe at every width 1.5 and 2 times
# (model.channels; the discriminator keeps its width)
WITH_PRIOR = {**run_vae.LOSS_RECIPES["adversarial"], "adv_prior": True}
RECIPES = {**{name: (terms, {}) for name, terms in run_vae.LOSS_RECIPES.items()},
           "plain, resize decoder": ({}, {"upsample": "resize"}),
           "adversarial, resize decoder": (run_vae.LOSS_RECIPES["adversarial"], {"upsample": "resize"}),
           "adv_prior": (WITH_PRIOR, {}),
           "adv_prior, antialiased disc": ({**WITH_PRIOR, "disc_antialias": True}, {}),
           "adv_prior, res blocks": (WITH_PRIOR, {"final_conv": True, "res_blocks": 1}),
           "adv_prior, res, bilinear": (WITH_PRIOR, {"final_conv": True, "res_blocks": 1, "upsample": "bilinear"}),
           "adv_prior, res, noise": (WITH_PRIOR, {"final_conv": True, "res_blocks": 1, "noise": True}),
           **{f"adv_prior, res, noise, channels {c}": (
               WITH_PRIOR, {"final_conv": True, "res_blocks": 1, "noise": True, "channels": c}) for c in (96, 128)},
           "soft_intro, res blocks": (run_vae.LOSS_RECIPES["soft_intro"], {"final_conv": True, "res_blocks": 1}),
           "adversarial, resize, projection + class head": (
               {**run_vae.LOSS_RECIPES["adversarial"], "disc_conditional": True, "disc_classify": 1.0},
               {"upsample": "resize", "conditional": True, "encoder_label": False}),
           "adversarial, resize, projection + class head on hue-turned images": (
               {**run_vae.LOSS_RECIPES["adversarial"], "disc_conditional": True, "disc_classify": 1.0,
                "disc_classify_aug": "hue"},
               {"upsample": "resize", "conditional": True, "encoder_label": False})}


def bench_recipes(args):
    """Seconds and GFLOP per image of one training step with each recipe (run_vae.sharp_step_cost), the
    recipes interleaved over rounds so the ratios to the plain step come from the same minutes."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = run_vae.pick_device(args.device)
    amp = run_vae.pick_precision("auto", device)
    seconds = {name: [] for name in RECIPES}
    flops = {}
    for r in range(args.rounds):
        for name in (RECIPES if r % 2 == 0 else list(RECIPES)[::-1]):
            loss, model = RECIPES[name]
            cost = run_vae.sharp_step_cost(loss, args.image_size, args.batch_size, amp, device=device, model=model)
            seconds[name].append(cost["seconds_per_image"])
            flops[name] = cost["gflop_per_image"]
    plain = statistics.median(seconds["plain"])
    fig = {name: {"seconds_per_image": statistics.median(v), "vs_plain": statistics.median(v) / plain,
                  "gflop_per_image": flops[name], "flops_vs_plain": flops[name] / flops["plain"]}
           for name, v in seconds.items()}
    lines = [f"one training step per recipe: {args.image_size}x{args.image_size}, batch {args.batch_size}, "
             f"{device}, {torch.get_num_threads()} thread(s), precision {amp or 'fp32'}"]
    model = {name: f"; model {m}" if m else "" for name, (_, m) in RECIPES.items()}
    width = max(map(len, RECIPES))
    lines += [f"{name:<{width}} {f['seconds_per_image'] * 1e3:7.1f} ms/image = {f['vs_plain']:.2f}x plain; "
              f"{f['gflop_per_image']:.2f} GFLOP/image = {f['flops_vs_plain']:.2f}x  "
              f"({RECIPES[name][0] or 'no extra terms'}{model[name]})"
              for name, f in fig.items()]
    log(args, "\n".join(lines))
    if args.json:
        print(json.dumps(fig))
    return fig


def log(args, text):
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def report(args, f, half, auto, base):
    w0 = [k for k in f if k.startswith("vs_baseline_w")]
    if "loss_fp32_seed_noise" in f:
        noise = (f"fp32 seed 0 vs seed 1: median {f['loss_fp32_seed_noise_median']:.1%}, max "
                 f"{f['loss_fp32_seed_noise']:.1%}, last quarter {f['loss_fp32_seed_noise_end']:.1%}")
    else:
        noise = f"fp32 minibatch noise {f['loss_minibatch_noise']:.1%}"
    lines = [
        "",
        f"{f['device']}, {torch.get_num_threads()} threads, {f['images']} images {f['image_size']}x{f['image_size']}, "
        f"batch {f['batch_size']}, latent {f['latent_dim']}, {f['epochs']} epoch(s) per run, {f['rounds']} round(s); "
        f"load average {f['load_average'][0]} -> {f['load_average'][1]}",
        f"ceiling: matmul {f['matmul_gflops_fp32']:.0f} GFLOP/s fp32, {f[f'matmul_gflops_{half}']:.0f} {half}; "
        f"{f['gflop_per_image']:.3f} GFLOP per image -> {f['ceiling_images_per_s_fp32']:.0f} img/s fp32, "
        f"{f[f'ceiling_images_per_s_{half}']:.0f} img/s {half}",
        f"run_vae fp32        {f['images_per_s_fp32']:7.1f} img/s end to end = {f['ceiling_fraction']:.0%} of the fp32 "
        f"ceiling; {f['step_images_per_s_fp32']:.1f} = {f['ceiling_fraction_steps']:.0%} in the step loop (data, steps, "
        f"logging: all but the per-epoch validation, grids and checkpoints)",
        f"run_vae {half}        {f[f'images_per_s_{half}']:7.1f} img/s end to end ({f[f'step_images_per_s_{half}']:.1f} "
        f"in the step loop) = {f[f'ceiling_fraction_{half}']:.0%} of the {half} ceiling, "
        f"{f[f'{half}_speedup']:.2f}x fp32",
        f"run_vae default     {f['images_per_s']:7.1f} img/s (precision auto -> {auto}); per-epoch validation, "
        f"grids and checkpoints take {f['epoch_end_fraction']:.1%} of it",
        f"  once a run: start-up {f['second_start_s']:.2f} s, prior fit after the last epoch {f['run_end_s']:.2f} s "
        f"({f['run_end_s_fp32']:.2f} s in fp32; {f['prior_fits_per_run']} fit(s) a run); counting both, "
        f"{f['images_per_s_with_start']:.1f} img/s for this {f['epochs']}-epoch run",
        f"  per epoch: {f['epoch_end_s']:.2f} s = "
        + ", ".join(f"{k} {v:.2f} s" for k, v in f["epoch_end_parts_s"].items()),
        f"plain baseline      {f['baseline_images_per_s']:7.1f} img/s ({base.replace('baseline_w', 'num_workers=')}) "
        f"-> default config is {f['vs_baseline']:.2f}x"
        + "".join(f", {f[k]:.2f}x against num_workers={k[len('vs_baseline_w'):]}" for k in w0),
        f"first-epoch loss, {f['loss_window']}-step moving average, relative gap: {half} vs fp32 (same seed) "
        f"median {f[f'loss_{half}_vs_fp32_median']:.1%}, max {f[f'loss_{half}_vs_fp32']:.1%}, last quarter "
        f"{f[f'loss_{half}_vs_fp32_end']:.1%}; {noise}",
        f"start-up of a second run (cache hit) to its first step: {f['second_start_s']:.2f} s "
        f"(python + imports {f['second_start_import_s']:.2f} s, cached data {f['second_start_load_data_s']:.2f} s); "
        f"first run's decode {f['cold_decode_s']:.1f} s",
        f"peak RSS: run_vae {f['peak_rss_mib']:.0f} MiB, baseline {f['baseline_peak_rss_mib']:.0f} MiB (main process)",
    ]
    log(args, "\n".join(lines))
    if args.json:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="class-per-folder images; generated when missing")
    p.add_argument("--subset", type=int, default=0, help="images per class (0 = all; generated: 300)")
    p.add_argument("--image_size", type=int, default=run_vae.DEFAULTS["data"]["image_size"])
    p.add_argument("--batch_size", type=int, default=64, help="the reference setting of the speed figures")
    p.add_argument("--latent_dim", type=int, default=run_vae.DEFAULTS["model"]["latent_dim"])
    p.add_argument("--epochs", type=int, default=1, help="epochs per measured run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; 2+ also gives the seed noise")
    p.add_argument("--baseline_workers", default="2,0", help="DataLoader num_workers; the first is the reference")
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every run (0 = torch's default). On a busy machine 1 gives steadier "
                        "ratios: a preempted OpenMP thread stalls the other at every barrier")
    p.add_argument("--quick", action="store_true", help="320 images per class")
    p.add_argument("--recipes", action="store_true", help="only the step cost of each loss recipe (plain, "
                                                          "perceptual, adversarial, both)")
    p.add_argument("--json", action="store_true", help="figures as one JSON object on the last line")
    p.add_argument("--data_paths", action="store_true",
                   help="instead: batches from the device, host memory and the memmap (data.*_budget)")
    p.add_argument("--ddp", default="", help="instead: torchrun with these numbers of processes, e.g. 1,2 (one "
                                             "per GPU; on CPUs with --threads each)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, job_file, out_file, started = args.child
        fn = {"trainer": child_trainer, "baseline": child_baseline}[kind]
        out = fn(json.loads(Path(job_file).read_text()), float(started))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(out_file).write_text(json.dumps(out))
        return 0
    if args.quick:
        args.subset = args.subset or 320
    args.baseline_workers = [int(w) for w in args.baseline_workers.split(",")]
    if args.recipes:
        bench_recipes(args)
        return 0
    fig = {}
    if args.data_paths:
        fig.update(data_paths=bench_data_paths(args))
    if args.ddp:
        fig.update(ddp=bench_ddp(args, [int(n) for n in args.ddp.split(",")]))
    if not fig:
        bench(args)
    elif args.json:
        print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
