"""
How fast does the gallery draw? Times what the Samples tab does for a grid (prior noise, the decoder, the
tile sheet, the PNG) against the decoder's forward pass alone on the same batch, best of --repeats, and
prints both and their ratio: the gallery's own overhead, whatever the machine.

    python bench/bench_ui.py                      # 64 samples at 64 px, the default model
    python bench/bench_ui.py --n 16 --image_size 128 model.final_conv=true model.res_blocks=1 model.noise=true
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_vae  # noqa: E402
import ui  # noqa: E402


def best_of(repeats, fn):
    """The shortest of repeats wall-clock runs of fn(), in seconds: the least disturbed by the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gallery_model(image_size, overrides):
    """The model of DEFAULTS with the overrides, untrained, in eval mode and laid out as ui.load_model leaves it."""
    cfg = run_vae.load_config(None, [f"data.image_size={image_size}", *overrides])
    return run_vae.build_model(cfg, 0).eval().to(memory_format=torch.channels_last)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="samples in the grid")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="the best of these many runs counts")
    p.add_argument("overrides", nargs="*", help="model.key=value, as for run_vae.py")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        model = gallery_model(args.image_size, args.overrides)
    except run_vae.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    z = torch.randn(args.n, model.latent_dim)

    def gallery():
        rows = ui.prior_samples(model, args.n, 0, 1.0)
        ui.png_bytes(ui.tile_sheet([(None, rows[0])], ui.tile_px("auto", args.image_size), numbers=True))

    with torch.no_grad():
        decoder = best_of(args.repeats, lambda: model.decode(z))
    grid = best_of(args.repeats, gallery)
    print(f"{args.n} samples at {args.image_size} px: decoder alone {decoder * 1e3:.0f} ms, "
          f"gallery grid {grid * 1e3:.0f} ms, ratio {grid / decoder:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
