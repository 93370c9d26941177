"""
Tests for prepare_data.py on tiny fake downloads made here (no network, no ../shared):
$ python -m pytest -q tests/test_prepare_data.py
"""

import csv
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prepare_data  # noqa: E402

# (split, variety) -> photo names; 'Test' reuses '0_100.jpg' of 'Apple Golden 1' to force a name clash
FRUITS = {
    ("Training", "Apple Golden 1"): ["0_100.jpg", "1_100.jpg", "r_0_100.jpg"],
    ("Test", "Apple Golden 1"): ["0_100.jpg", "5_100.jpg"],
    ("Training", "Apple Golden 2"): ["0_100.jpg"],
    ("Training", "Apple Golden 3"): ["0_100.jpg"],
    ("Training", "Apple Red Yellow 1"): ["0_100.jpg", "r_1_100.jpg"],
    ("Test", "Apple Red Yellow 2"): ["r2_0_100.jpg"],
    ("Training", "Apple Red 1"): ["0_100.jpg"],
    ("Training", "Apple Red 2"): ["0_100.jpg"],
    ("Test", "Apple Red 3"): ["3_100.jpg"],
    ("Training", "Banana"): ["0_100.jpg"],  # not an apple: must be ignored
}
MOJIBAKE_I = "\u251c\u00e2\u252c\u00a1"  # 'í' after UTF-8 -> cp1252 -> UTF-8 -> cp437, as some unzips leave it


def write_jpeg(path, colour=(200, 30, 30), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_fruits(root):
    for n, ((split, variety), names) in enumerate(sorted(FRUITS.items())):
        for m, name in enumerate(names):
            write_jpeg(root / split / variety / name, colour=(n * 10, m * 40, 100))
    return root


def make_wikiart(root):
    """An Impressionism folder with awkward names and a classes.csv that names them differently."""
    files = {
        "claude-monet_water-lilies.jpg": "['landscape']",
        "claude-monet_impression-sunrise(1).jpg": "['cityscape', 'marina']",  # one of ours + another
        "edgar-degas_dancers, 2.jpg": "['genre painting']",  # comma, space, spelled with a space
        f"joaqu{MOJIBAKE_I}n-sorolla_the-milkmaid.jpg": None,  # csv says joaquín (mangled on unzip)
        "antonio-de-carvalho_recanto.jpg": None,  # csv says antónio (accent stripped on unzip)
        "mary-cassatt_the-tea.jpg": "['portrait', 'genre_painting']",  # two of ours: ambiguous
        "pierre-auguste-renoir_l'ingénue.jpg": "['portrait']",
        "paul-cezanne_still-life.jpg": "['still_life']",  # not one of ours
    }
    for n, name in enumerate(files):
        write_jpeg(root / "Impressionism" / name, colour=(n * 20, 90, 160))
    write_jpeg(root / "Realism" / "gustave-courbet_the-stone-breakers.jpg")
    rows = [(f"Impressionism/{name}", genre) for name, genre in files.items() if genre]
    rows += [
        ("Impressionism/joaquín-sorolla_the-milkmaid.jpg", "['portrait']"),
        ("Impressionism/antónio-de-carvalho_recanto.jpg", "['genre_painting']"),
        ("Impressionism/claude-monet_lost-painting.jpg", "['landscape']"),  # labelled but not downloaded
        ("Realism/gustave-courbet_the-stone-breakers.jpg", "['genre_painting']"),  # other style
    ]
    with open(root / "classes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "artist", "genre", "description", "subset"])
        writer.writerows([(name, "someone", genre, "a painting", "train") for name, genre in rows])
    return root


def run(*argv):
    return prepare_data.main([str(a) for a in argv])


def listing(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def snapshot(folder):
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in folder.rglob("*") if p.is_file()}


def read_manifest(dst):
    with open(dst / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_apples_mapping_names_and_counts(tmp_path, capsys):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "data_apples"
    run("apples", "--src", src, "--dst", dst)
    assert listing(dst) == {
        "manifest.csv",
        "Golden/Golden1_0_100.jpg", "Golden/Golden1_1_100.jpg", "Golden/Golden1_r_0_100.jpg",
        "Golden/Golden1_0_100_test.jpg", "Golden/Golden1_5_100.jpg",  # the Test clash gets a tag
        "Golden/Golden2_0_100.jpg", "Golden/Golden3_0_100.jpg",
        "Golden-Red/RedYellow1_0_100.jpg", "Golden-Red/RedYellow1_r_1_100.jpg", "Golden-Red/RedYellow2_r2_0_100.jpg",
        "Red/Red1_0_100.jpg", "Red/Red2_0_100.jpg", "Red/Red3_3_100.jpg",
    }
    assert (dst / "Golden/Golden1_0_100_test.jpg").read_bytes() == (src / "Test/Apple Golden 1/0_100.jpg").read_bytes()
    table = capsys.readouterr().out
    assert "Golden " in table and " 7 " in table and "13 new file(s)" in table


def test_manifest_rows_and_sha1(tmp_path):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"
    run("apples", "--src", src, "--dst", dst)
    rows = read_manifest(dst)
    assert list(rows[0]) == ["class", "file", "source", "sha1"]
    assert len(rows) == 13 and rows == sorted(rows, key=lambda r: (r["class"], r["file"]))
    by_file = {r["file"]: r for r in rows}
    assert by_file["Golden1_0_100_test.jpg"]["source"] == "Test/Apple Golden 1/0_100.jpg"
    for row in rows:
        stored = (dst / row["class"] / row["file"]).read_bytes()
        original = (src / row["source"]).read_bytes()
        assert row["sha1"] == hashlib.sha1(stored).hexdigest() == hashlib.sha1(original).hexdigest()


def test_second_run_changes_nothing_and_source_is_untouched(tmp_path, capsys):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"
    before_src = snapshot(src)
    run("apples", "--src", src, "--dst", dst)
    first = snapshot(dst)
    capsys.readouterr()
    run("apples", "--src", src, "--dst", dst)
    assert snapshot(dst) == first  # same files, same bytes, not even rewritten
    assert "0 new file(s)" in capsys.readouterr().out
    assert snapshot(src) == before_src


def test_dry_run_writes_nothing(tmp_path, capsys):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"
    run("apples", "--src", src, "--dst", dst, "--dry-run")
    assert not dst.exists()
    assert "would write 13 new file(s)" in capsys.readouterr().out


def test_size_stores_centre_crops(tmp_path):
    src, dst = tmp_path / "fruits-360", tmp_path / "out"
    # a wide image: left third red, the rest blue, so a centre crop of the shorter side is all blue
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    write_jpeg(src / "Training/Apple Golden 1/0_100.jpg")
    image.save(src / "Training/Apple Golden 1/0_100.jpg")
    mapping = write_json(tmp_path, {"Golden": ["Apple Golden 1"]})
    run("apples", "--src", src, "--dst", dst, "--size", "4", "--mapping", mapping)
    with Image.open(dst / "Golden/Golden1_0_100.jpg") as stored:
        assert stored.size == (4, 4) and stored.format == "JPEG"
        red, _, blue = stored.getpixel((1, 1))
        assert blue > 200 and red < 60
    run("apples", "--src", src, "--dst", dst, "--size", "6", "--mapping", mapping)
    with Image.open(dst / "Golden/Golden1_0_100.jpg") as stored:  # a new size replaces the old copies
        assert stored.size == (6, 6)


def write_json(tmp_path, mapping):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(mapping))
    return path


def test_link_shares_the_file(tmp_path):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"
    run("apples", "--src", src, "--dst", dst, "--link")
    assert os.path.samefile(dst / "Red/Red3_3_100.jpg", src / "Test/Apple Red 3/3_100.jpg")


def test_link_falls_back_to_copy_with_a_warning(tmp_path, monkeypatch, capsys):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"

    def cross_device(a, b):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(prepare_data.os, "link", cross_device)
    run("apples", "--src", src, "--dst", dst, "--link")
    assert len(listing(dst)) == 14
    assert capsys.readouterr().err.count("cannot hard-link (Invalid cross-device link), copying instead") == 1


def test_mapping_from_yaml(tmp_path):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"
    mapping = tmp_path / "apples.yaml"
    mapping.write_text("# two classes only\nYellow: [Apple Golden 1, 'Apple Golden 2']\nRed and yellow:\n"
                       "  - Apple Red Yellow 1\n  - \"Apple Red Yellow 2\"  # both varieties\n")
    assert prepare_data.load_mapping(mapping) == {
        "Yellow": ["Apple Golden 1", "Apple Golden 2"], "Red and yellow": ["Apple Red Yellow 1", "Apple Red Yellow 2"]}
    run("apples", "--src", src, "--dst", dst, "--mapping", mapping)
    assert {p.name for p in dst.iterdir()} == {"Yellow", "Red and yellow", "manifest.csv"}
    assert len(list((dst / "Yellow").iterdir())) == 6


def test_unreadable_images_are_listed_and_skipped(tmp_path, capsys):
    src, dst = make_fruits(tmp_path / "fruits-360"), tmp_path / "out"
    # a truncated download: the header is intact, so only decoding the pixels can tell
    truncated = src / "Training/Apple Red 1/1_100.jpg"
    Image.effect_noise((64, 64), 80).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-300])
    (src / "Training/Apple Red 2/1_100.jpg").write_text("not an image")
    run("apples", "--src", src, "--dst", dst)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image(s)" in err and "Apple Red 1/1_100.jpg" in err and "Apple Red 2/1_100.jpg" in err
    assert not (dst / "Red/Red1_1_100.jpg").exists() and (dst / "Red/Red1_0_100.jpg").exists()
    assert len(read_manifest(dst)) == 13


@pytest.mark.parametrize("layout, expected", [
    ("missing", ["does not exist", "Training/Apple Golden 1/*.jpg", "moltean/fruits", "fruits-360"]),
    ("empty", ["has no Training/ or Test/ folder", "moltean/fruits"]),
    ("nested", ["Found Training/ in", "pass that as --src"]),
    ("no golden 3", ["has no ['Apple Golden 3'] folder", "--mapping", "moltean/fruits"]),
])
def test_apples_wrong_src_says_what_it_expected(tmp_path, layout, expected):
    src = tmp_path / "download"
    if layout == "empty":
        src.mkdir()
    elif layout == "nested":
        make_fruits(src / "fruits-360_dataset" / "fruits-360")
    elif layout == "no golden 3":
        make_fruits(src)
        (src / "Training/Apple Golden 3/0_100.jpg").unlink()
        (src / "Training/Apple Golden 3").rmdir()
    with pytest.raises(SystemExit) as error:
        run("apples", "--src", src, "--dst", tmp_path / "out")
    assert all(text in str(error.value.code) for text in expected), error.value.code
    assert not (tmp_path / "out").exists()


def test_safe_name_matches_the_reference_naming():
    assert prepare_data.safe_name("claude-monet_an-orchard(1).jpg") == "claude-monet_an-orchard(1).jpg"
    assert prepare_data.safe_name("t.-c.-steele_street-scene.jpg") == "t.-c.-steele_street-scene.jpg"
    assert prepare_data.safe_name(f"joaqu{MOJIBAKE_I}n-sorolla_x.jpg") == "joaqu__________n-sorolla_x.jpg"
    assert prepare_data.safe_name("Golden1_a b:c?.jpg") == "Golden1_a_b_c_.jpg"


def test_impressionism_genres_odd_names_and_fallback_matching(tmp_path, capsys):
    src, dst = make_wikiart(tmp_path / "wikiart"), tmp_path / "data_impressionism"
    before_src = snapshot(src)
    run("impressionism", "--src", src, "--dst", dst)
    assert listing(dst) == {
        "manifest.csv",
        "landscape/claude-monet_water-lilies.jpg",
        "cityscape/claude-monet_impression-sunrise(1).jpg",
        "genre_painting/edgar-degas_dancers__2.jpg",
        "genre_painting/antonio-de-carvalho_recanto.jpg",
        "portrait/joaqu__________n-sorolla_the-milkmaid.jpg",
        "portrait/pierre-auguste-renoir_l_ing__nue.jpg",
    }
    sources = {r["file"]: r["source"] for r in read_manifest(dst)}
    mangled = f"Impressionism/joaqu{MOJIBAKE_I}n-sorolla_the-milkmaid.jpg"
    assert sources["joaqu__________n-sorolla_the-milkmaid.jpg"] == mangled
    err = capsys.readouterr().err
    assert "skipped 1 labelled painting(s) with several of the genres" in err and "mary-cassatt_the-tea" in err
    assert "skipped 1 labelled painting(s) not found" in err and "lost-painting" in err
    assert snapshot(src) == before_src
    run("impressionism", "--src", src, "--dst", dst)
    assert "0 new file(s)" in capsys.readouterr().out


def test_impressionism_max_per_class_and_genres(tmp_path):
    src, dst = tmp_path / "wikiart", tmp_path / "out"
    names = [f"artist-{n}_landscape-{n}.jpg" for n in range(12)]
    for name in names:
        write_jpeg(src / "Impressionism" / name)
    lines = [f"Impressionism/{name},\"['landscape']\"\n" for name in names]
    (src / "classes.csv").write_text("filename,genre\n" + "".join(lines))
    run("impressionism", "--src", src, "--dst", dst, "--max-per-class", "5", "--genres", "landscape")
    chosen = listing(dst / "landscape")
    assert len(chosen) == 5 and chosen != set(sorted(names)[:5])  # a sample, not the first names
    run("impressionism", "--src", src, "--dst", tmp_path / "again", "--max-per-class", "5", "--genres", "landscape")
    assert listing(tmp_path / "again" / "landscape") == chosen


def test_impressionism_artgan_labels(tmp_path):
    src, dst = make_wikiart(tmp_path / "wikiart"), tmp_path / "out"
    (src / "classes.csv").unlink()
    train, val = tmp_path / "genre_train.csv", tmp_path / "genre_val.csv"
    train.write_text("Impressionism/claude-monet_water-lilies.jpg,6\nImpressionism/edgar-degas_dancers, 2.jpg,2\n"
                     "Realism/gustave-courbet_the-stone-breakers.jpg,2\n")
    # the ArtGAN files spell joaquín as 'joaquã\xadn' (UTF-8 read as cp1252, lower-cased)
    val.write_text("Impressionism/joaqu\u00e3\u00adn-sorolla_the-milkmaid.jpg,1\n"
                   "Impressionism/paul-cezanne_still-life.jpg,9\n", encoding="utf-8")
    run("impressionism", "--src", src, "--dst", dst, "--labels", train, val)
    assert listing(dst) == {"manifest.csv", "portrait/claude-monet_water-lilies.jpg",
                            "genre_painting/edgar-degas_dancers__2.jpg",
                            "cityscape/joaqu__________n-sorolla_the-milkmaid.jpg"}


@pytest.mark.parametrize("layout, expected", [
    ("missing", ["does not exist", "Impressionism/*.jpg", "classes.csv", "steubk/wikiart"]),
    ("no style folder", ["has no Impressionism/ folder", "steubk/wikiart"]),
    ("no classes.csv", ["has no classes.csv", "--labels", "steubk/wikiart"]),
    ("wrong columns", ["'filename'", "'genre'", "steubk/wikiart"]),
    ("styles not genres", ["has any of the genres", "--labels"]),
    ("bad labels line", ["line 1", "path,class_index"]),
])
def test_impressionism_wrong_src_says_what_it_expected(tmp_path, layout, expected):
    src, extra = tmp_path / "wikiart", []
    if layout != "missing":
        make_wikiart(src)
    if layout == "no style folder":
        os.rename(src / "Impressionism", src / "impressionist")
    elif layout == "no classes.csv":
        (src / "classes.csv").unlink()
    elif layout == "wrong columns":
        (src / "classes.csv").write_text("file,style\nImpressionism/a.jpg,landscape\n")
    elif layout == "styles not genres":
        (src / "classes.csv").write_text("filename,genre\nImpressionism/claude-monet_water-lilies.jpg,['Realism']\n")
    elif layout == "bad labels line":
        (tmp_path / "labels.csv").write_text("Impressionism/claude-monet_water-lilies.jpg landscape\n")
        extra = ["--labels", tmp_path / "labels.csv"]
    with pytest.raises(SystemExit) as error:
        run("impressionism", "--src", src, "--dst", tmp_path / "out", *extra)
    assert all(text in str(error.value.code) for text in expected), error.value.code
    assert not (tmp_path / "out").exists()


def test_bad_option_combinations_exit_cleanly(tmp_path, capsys):
    src = make_fruits(tmp_path / "fruits-360")
    with pytest.raises(SystemExit):
        run("apples", "--src", src, "--dst", tmp_path / "out", "--link", "--size", "8")
    assert "cannot be combined with --size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        run("apples", "--src", src, "--dst", src / "inside")
    assert "inside --src" in str(error.value.code)
