r"""
Build the class folders the VAEs train on (data_apples/, data_impressionism/) from the
public downloads: one sub-folder per class, plus manifest.csv (class,file,source,sha1).

Fruits-360 apples, Training/ and Test/ together -> Golden, Golden-Red, Red:
$ python prepare_data.py apples --src ~/Downloads/fruits-360 --dst data_apples

WikiArt Impressionism, labels from the Kaggle classes.csv -> landscape, genre_painting, portrait, cityscape:
$ python prepare_data.py impressionism --src ~/Downloads/wikiart --dst data_impressionism

or labels from the ArtGAN genre split files, at most 1000 paintings a class:
$ python prepare_data.py impressionism --src ~/Downloads/wikiart --dst data_impressionism \
      --labels genre_train.csv genre_val.csv --max-per-class 1000

--size 64 stores 64x64 copies, --link hard-links instead of copying, --dry-run writes nothing,
--mapping apples.yaml replaces the apple table, --genres replaces the four genres.
The source is only ever read, and a second run with the same arguments copies nothing.
"""

import argparse
import ast
import csv
import hashlib
import io
import os
import re
import shutil
import sys
import unicodedata
from pathlib import Path, PurePosixPath

import yaml
from PIL import Image, ImageOps
from tqdm import tqdm

FRUITS_DOWNLOAD = ("Kaggle 'moltean/fruits' (https://www.kaggle.com/datasets/moltean/fruits) "
                   "or the 'fruits-360' GitHub repository (https://github.com/fruits-360)")
WIKIART_DOWNLOAD = "Kaggle 'steubk/wikiart' (https://www.kaggle.com/datasets/steubk/wikiart)"
FRUITS_SPLITS = ["Training", "Test"]  # in this order: on a name clash the Training file keeps the plain name
APPLE_CLASSES = {
    "Golden": ["Apple Golden 1", "Apple Golden 2", "Apple Golden 3"],
    "Golden-Red": ["Apple Red Yellow 1", "Apple Red Yellow 2"],
    "Red": ["Apple Red 1", "Apple Red 2", "Apple Red 3"],
}
WIKIART_STYLE = "Impressionism"
IMPRESSIONISM_GENRES = ["landscape", "genre_painting", "portrait", "cityscape"]
# class index -> genre in the ArtGAN genre_train.csv / genre_val.csv files
ARTGAN_GENRES = ["abstract_painting", "cityscape", "genre_painting", "illustration", "landscape",
                 "nude_painting", "portrait", "religious_painting", "sketch_and_study", "still_life"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
UNSAFE_BYTES = re.compile(rb"[^A-Za-z0-9().\-_]")


def fail(message):
    raise SystemExit(f"prepare_data.py: error: {message}")


def safe_name(name):
    # byte-wise, so a non-ASCII character becomes one '_' per UTF-8 byte: the names then match the data
    # folders the project's results were measured on, and names that are not valid UTF-8 (surrogateescape) work too
    return UNSAFE_BYTES.sub(b"_", os.fsencode(name)).decode("ascii")


def folded_key(name):
    # 'joaquín' and a download that stripped the accent, 'joaquin', give the same key
    return re.sub(r"[^a-z0-9]", "", unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower())


def skeleton_key(name):
    # non-ASCII characters dropped unfolded, so 'í', its mojibake 'Ã­' and '├â┬¡' all vanish alike
    return re.sub(r"[^a-z0-9]", "", name.lower().encode("ascii", "ignore").decode())


def unique_name(cls, name, tag, taken):
    # the first source keeps its plain name and later ones get a tag; sources come in sorted order,
    # so every run gives the same names. Compared lower-case for case-blind filesystems.
    stem, suffix = os.path.splitext(name)
    candidates = [name] + [f"{stem}_{tag}{'' if n == 1 else n}{suffix}" for n in range(1, 10_000)]
    name = next(c for c in candidates if (cls, c.lower()) not in taken)
    taken.add((cls, name.lower()))
    return name


def nested_hint(src, folder):
    # Kaggle zips often add a level or two above the expected layout
    found = sorted(str(p.parent) for p in [*src.glob(f"*/{folder}"), *src.glob(f"*/*/{folder}")])
    return f" Found {folder}/ in {found[0]}: pass that as --src." if found else ""


def load_mapping(path):
    """{class: [variety folder, ...]} from a YAML or JSON file (JSON is YAML too)."""
    path = Path(path)
    if not path.is_file():
        fail(f"--mapping {path} does not exist")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        fail(f"--mapping {path}: not valid YAML or JSON ({e})")
    if not (isinstance(mapping, dict) and mapping and all(
            isinstance(v, list) and v and all(isinstance(s, str) for s in v) for v in mapping.values())):
        fail(f"--mapping {path}: expected {{class name: [variety folder, ...]}}, e.g. Golden: [Apple Golden 1]")
    if any(re.search(r"[/\\]", c) or c.strip(".") == "" for c in mapping):  # a class is one folder inside --dst
        fail(f"--mapping {path}: class names must be plain folder names, got {list(mapping)}")
    return mapping


def plan_apples(src, mapping):
    """[(class, output name, source path)] for every photo of the mapped varieties, both splits."""
    expected = f"Fruits-360 laid out as {src}/Training/Apple Golden 1/*.jpg and {src}/Test/Apple Golden 1/*.jpg"
    if not src.is_dir():
        fail(f"--src {src} does not exist. Expected {expected}. Download Fruits-360 from {FRUITS_DOWNLOAD}.")
    splits = [split for split in FRUITS_SPLITS if (src / split).is_dir()]
    if not splits:
        fail(f"--src {src} has no Training/ or Test/ folder. Expected {expected}.{nested_hint(src, 'Training')} "
             f"Download Fruits-360 from {FRUITS_DOWNLOAD}.")
    missing = [v for vs in mapping.values() for v in vs if not any((src / s / v).is_dir() for s in splits)]
    if missing:
        present = sorted({p.name for split in splits for p in (src / split).glob("Apple*")})
        fail(f"{src} has no {missing} folder under {' or '.join(splits)}/ (apple folders there: {present}). "
             f"Expected {expected}; use --mapping for other folder names. Download from {FRUITS_DOWNLOAD}.")
    plan, taken = [], set()
    for cls, varieties in mapping.items():
        for variety in varieties:
            prefix = re.sub(r"^Apple ", "", variety).replace(" ", "")  # 'Apple Red Yellow 1' -> 'RedYellow1'
            for split in splits:
                folder = src / split / variety
                for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        name = unique_name(cls, safe_name(f"{prefix}_{path.name}"), split.lower(), taken)
                        plan.append((cls, name, path))
    return plan, {}


def parse_genres(text):
    # "['landscape', 'genre painting']" -> ['landscape', 'genre_painting']
    try:
        genres = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        genres = text.strip("[]").split(",")
    genres = [genres] if isinstance(genres, str) else genres
    return [re.sub(r"[\s-]+", "_", str(g).strip().strip("'\"").lower()) for g in genres]


def read_labels(src, label_files):
    """[(filename relative to the download, [genre, ...])] from classes.csv or ArtGAN split files."""
    if not label_files:
        with open(src / "classes.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            if not {"filename", "genre"} <= set(reader.fieldnames or []):
                fail(f"{src / 'classes.csv'} has columns {reader.fieldnames}; expected the Kaggle WikiArt classes.csv "
                     f"with 'filename' (e.g. Impressionism/claude-monet_water-lilies.jpg) and 'genre' "
                     f"(e.g. ['landscape']). Download it from {WIKIART_DOWNLOAD}.")
            return [(row["filename"], parse_genres(row["genre"] or "")) for row in reader]
    rows = []
    for path in map(Path, label_files):
        if not path.is_file():
            fail(f"--labels {path} does not exist. Expected an ArtGAN genre split file of 'path,class_index' "
                 f"lines such as 'Impressionism/claude-monet_water-lilies.jpg,4'")
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
            # split at the last comma rather than use csv: these files do not quote names that hold commas
            name, _, index = line.strip().rpartition(",")
            if line.strip() and not (name and index.strip().isdigit() and int(index) < len(ARTGAN_GENRES)):
                fail(f"--labels {path} line {number}: expected 'path,class_index' with index 0-9, got {line!r}")
            if line.strip():
                rows.append((name, [ARTGAN_GENRES[int(index)]]))
    return rows


def plan_impressionism(src, genres, label_files):
    """[(genre, output name, source path)] for the labelled paintings that have exactly one of genres."""
    expected = f"the Kaggle WikiArt layout: {src}/{WIKIART_STYLE}/*.jpg and {src}/classes.csv"
    if not src.is_dir():
        fail(f"--src {src} does not exist. Expected {expected}. Download WikiArt from {WIKIART_DOWNLOAD}.")
    style_dir = src / WIKIART_STYLE
    if not style_dir.is_dir():
        fail(f"--src {src} has no {WIKIART_STYLE}/ folder. Expected {expected}.{nested_hint(src, WIKIART_STYLE)} "
             f"Download WikiArt from {WIKIART_DOWNLOAD}.")
    if not label_files and not (src / "classes.csv").is_file():
        fail(f"--src {src} has no classes.csv. Expected {expected}, or pass ArtGAN genre split files "
             f"with --labels. Download WikiArt from {WIKIART_DOWNLOAD}.")
    rows = read_labels(src, label_files)
    if not any(set(row_genres) & set(genres) for _, row_genres in rows):
        fail(f"no painting in {label_files or src / 'classes.csv'} has any of the genres {genres}. If its "
             f"'genre' column lists styles rather than genres, pass the ArtGAN genre files with --labels.")

    # the downloaded names can differ from the labels in non-ASCII characters, so besides the exact
    # (NFC) name try two looser keys, and take a loose match only when it is unambiguous
    key_functions = [lambda n: unicodedata.normalize("NFC", n), folded_key, skeleton_key]
    tables = [{} for _ in key_functions]
    for path in sorted(style_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            for key_function, table in zip(key_functions, tables):
                table.setdefault(key_function(path.name), []).append(path)

    plan, taken, used, skipped = [], set(), set(), {"with several of the genres": [], "not found": []}
    for filename, row_genres in sorted(rows):
        parts = PurePosixPath(filename.replace("\\", "/")).parts
        wanted = [g for g in genres if g in row_genres]
        if len(parts) < 2 or parts[-2].lower() != WIKIART_STYLE.lower() or not wanted:
            continue
        if len(wanted) > 1:  # a painting in two classes would blur both, so it is left out
            skipped["with several of the genres"].append(filename)
            continue
        path = next((hits[0] for f, table in zip(key_functions, tables)
                     if len(hits := table.get(f(parts[-1]), [])) == 1), None)
        if path is None:
            skipped["not found"].append(filename)
        elif path not in used:  # a file listed twice is stored once
            used.add(path)
            plan.append((wanted[0], unique_name(wanted[0], safe_name(path.name), "dup", taken), path))
    return plan, skipped


def is_readable_image(path):
    # load() rather than verify(): verify() does not decode JPEG data, so a truncated download would
    # pass. draft() lets the JPEG decoder work at 1/8 scale, which keeps the full check cheap.
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
        return True
    except Exception:
        return False


def is_up_to_date(out, src, size):
    if not out.is_file():
        return False
    if size is None:
        return out.stat().st_size == src.stat().st_size
    with Image.open(out) as image:
        return image.size == (size, size)


def store(src, out, size, link, warnings):
    out.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target, then rename: an interrupted run leaves no half file for a rerun to keep,
    # and replacing an old hard link never writes into the source file it shares
    tmp = out.with_name(out.name + ".tmp")
    if size:
        with Image.open(src) as image:
            square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        square.save(tmp, format=Image.registered_extensions()[out.suffix.lower()], quality=95)
    elif link:
        try:
            os.link(src, tmp)
        except OSError as e:  # EXDEV across devices, or a filesystem without hard links
            warnings.setdefault("link", f"cannot hard-link ({e.strerror}), copying instead")
            shutil.copyfile(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, out)


def build(plan, src, dst, classes, size=None, link=False, dry_run=False, max_per_class=None, skipped=None):
    """Store the plan in dst, write dst/manifest.csv and print a per-class count table."""
    if dst.resolve().is_relative_to(src.resolve()):
        fail(f"--dst {dst} is inside --src {src}; the source is never written to, choose another --dst")
    if max_per_class:  # a hash order samples all artists and varieties, unlike the first N names, and is stable
        plan = sorted(plan, key=lambda item: (item[0], hashlib.sha1(item[1].encode()).hexdigest()))
    counts = {cls: {"new": 0, "kept": 0} for cls in classes}
    rows, warnings, unreadable = [], {}, []
    for cls, name, path in tqdm(plan, desc="preparing", unit="img", disable=None):
        count = counts[cls]
        out = dst / cls / name
        if max_per_class and count["new"] + count["kept"] >= max_per_class:
            continue
        if is_up_to_date(out, path, size):
            count["kept"] += 1
        elif not is_readable_image(path):
            unreadable.append(str(path))
            continue
        else:
            count["new"] += 1
            if not dry_run:
                store(path, out, size, link, warnings)
        sha1 = "" if dry_run else hashlib.sha1(out.read_bytes()).hexdigest()
        rows.append((cls, name, path.relative_to(src).as_posix(), sha1))

    print(f"{'class':<20} {'new':>7} {'kept':>7} {'total':>7}")
    for cls, count in [*counts.items(), ("total", {k: sum(c[k] for c in counts.values()) for k in ("new", "kept")})]:
        print(f"{cls:<20} {count['new']:>7} {count['kept']:>7} {count['new'] + count['kept']:>7}")
    for message in warnings.values():
        print(f"warning: {message}", file=sys.stderr)
    if unreadable:
        print(f"warning: skipped {len(unreadable)} unreadable image(s):\n  " + "\n  ".join(unreadable), file=sys.stderr)
    for reason, names in (skipped or {}).items():
        if names:
            shown = "\n  ".join(names[:10]) + ("\n  ..." if len(names) > 10 else "")
            print(f"warning: skipped {len(names)} labelled painting(s) {reason}:\n  {shown}", file=sys.stderr)
    new = sum(c["new"] for c in counts.values())
    if dry_run:
        print(f"dry run: would write {new} new file(s) to {dst}; nothing written")
        return rows

    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["class", "file", "source", "sha1"])
    writer.writerows(sorted(rows))
    manifest_path, text = dst / "manifest.csv", manifest.getvalue().encode("utf-8", "surrogateescape")
    if not manifest_path.is_file() or manifest_path.read_bytes() != text:  # an unchanged manifest is not rewritten
        dst.mkdir(parents=True, exist_ok=True)
        manifest_path.write_bytes(text)
    print(f"{new} new file(s) in {dst}, manifest at {manifest_path}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--src", type=Path, required=True, help="the unpacked download (only read)")
    common.add_argument("--dst", type=Path, required=True, help="output folder, one sub-folder per class")
    common.add_argument("--size", type=int, help="store NxN copies: shorter side resized to N (Lanczos), "
                        "centre-cropped to NxN, saved as JPEG quality 95 (default: copy as is)")
    common.add_argument("--link", action="store_true", help="hard-link instead of copying (copies across devices)")
    common.add_argument("--dry-run", action="store_true", help="print what would be done, write nothing")
    common.add_argument("--max-per-class", type=int, help="keep at most N images a class (a fixed hash-order sample)")
    commands = parser.add_subparsers(dest="dataset", required=True)
    apples = commands.add_parser("apples", parents=[common], help="Fruits-360 apples -> Golden, Golden-Red, Red")
    apples.add_argument("--mapping", help="YAML or JSON {class: [variety folder, ...]} replacing the built-in table")
    impressionism = commands.add_parser("impressionism", parents=[common], help="WikiArt Impressionism by genre")
    impressionism.add_argument("--labels", nargs="+", help="ArtGAN genre split files ('path,class_index' lines) "
                               "to use instead of classes.csv")
    impressionism.add_argument("--genres", nargs="+", default=IMPRESSIONISM_GENRES,
                               help=f"genres to build (default: {' '.join(IMPRESSIONISM_GENRES)})")
    args = parser.parse_args(argv)
    if (args.size is not None and args.size < 1) or (args.max_per_class is not None and args.max_per_class < 1):
        parser.error("--size and --max-per-class must be positive")
    if args.size and args.link:
        parser.error("--link stores the originals, so it cannot be combined with --size")

    if args.dataset == "apples":
        mapping = load_mapping(args.mapping) if args.mapping else APPLE_CLASSES
        classes, (plan, skipped) = list(mapping), plan_apples(args.src, mapping)
    else:
        genres = [re.sub(r"[\s-]+", "_", g.lower()) for g in args.genres]
        if args.labels and set(genres) - set(ARTGAN_GENRES):
            parser.error(f"--genres {sorted(set(genres) - set(ARTGAN_GENRES))} are not ArtGAN genres: {ARTGAN_GENRES}")
        classes, (plan, skipped) = genres, plan_impressionism(args.src, genres, args.labels)
    return build(plan, args.src, args.dst, classes, args.size, args.link, args.dry_run, args.max_per_class, skipped)


if __name__ == "__main__":
    main()
