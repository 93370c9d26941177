"""Data: class folders, decoding once, the disk cache, corrupt files, splits and the demo set."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import run_vae
from conftest import make_image_folder
from run_vae import DataError, load_image_folder


def test_loads_classes_in_sorted_order_resized_to_size(image_folder, tmp_path):
    # a grayscale and an RGBA image must come out RGB
    Image.new("L", (40, 30), 128).save(image_folder / "Red" / "gray.png")
    Image.new("RGBA", (30, 50), (1, 2, 3, 4)).save(image_folder / "Red" / "rgba.webp")
    data = load_image_folder(image_folder, 16)
    assert data.classes == ["Golden", "Golden-Red", "Red"]
    assert data.images.shape == (38, 3, 16, 16) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [12, 12, 14]


def test_corrupt_files_are_skipped_with_one_warning_listing_them(image_folder):
    (image_folder / "Red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (image_folder / "Golden" / "truncated.png").write_bytes((image_folder / "Golden" / "001.png").read_bytes()[:40])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(image_folder, 16)
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 1 and "broken.jpg" in messages[0] and "truncated.png" in messages[0]
    assert len(data) == 36


def test_missing_root_names_the_path_and_where_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*README"):
        load_image_folder(tmp_path / "nowhere", 16)


def test_empty_class_folder_is_an_error(image_folder):
    (image_folder / "Empty").mkdir()
    with pytest.raises(DataError, match="Empty.*no images"):
        load_image_folder(image_folder, 16)


def test_folder_without_class_folders_is_an_error(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "flat", 16)


def test_second_load_comes_from_the_cache_without_decoding(image_folder, tmp_path, monkeypatch):
    first = load_image_folder(image_folder, 16, tmp_path / "cache")
    monkeypatch.setattr(run_vae, "decode_image", lambda *a: pytest.fail("decoded again despite the cache"))
    second = load_image_folder(image_folder, 16, tmp_path / "cache")
    assert torch.equal(first.images, second.images) and first.files == second.files


def test_cache_is_invalidated_by_changed_files_or_size(image_folder, tmp_path):
    load_image_folder(image_folder, 16, tmp_path / "cache")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(image_folder / "Red" / "new.png")
    assert len(load_image_folder(image_folder, 16, tmp_path / "cache")) == 37
    assert load_image_folder(image_folder, 32, tmp_path / "cache").images.shape[-1] == 32
    assert len(list((tmp_path / "cache").glob("images_*.pt"))) == 3


def test_damaged_cache_is_rebuilt(image_folder, tmp_path):
    load_image_folder(image_folder, 16, tmp_path / "cache")
    for f in (tmp_path / "cache").glob("*.pt"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        assert len(load_image_folder(image_folder, 16, tmp_path / "cache")) == 36


def test_split_is_deterministic_disjoint_and_complete():
    a_train, a_val = run_vae.split_train_val(100, 0.1, seed=3)
    b_train, b_val = run_vae.split_train_val(100, 0.1, seed=3)
    _, c_val = run_vae.split_train_val(100, 0.1, seed=4)
    assert torch.equal(a_val, b_val) and torch.equal(a_train, b_train)
    assert len(a_val) == 10 and not set(a_val.tolist()) & set(a_train.tolist())
    assert sorted(a_val.tolist() + a_train.tolist()) == list(range(100))
    assert not torch.equal(a_val, c_val)


def test_demo_set_is_deterministic_with_three_distinct_classes(tmp_path):
    run_vae.make_demo_dataset(tmp_path / "a", per_class=4)
    run_vae.make_demo_dataset(tmp_path / "b", per_class=4)
    a, b = load_image_folder(tmp_path / "a", 32), load_image_folder(tmp_path / "b", 32)
    assert a.classes == ["Golden", "Golden-Red", "Red"] and len(a) == 12
    assert torch.equal(a.images, b.images)
    # the classes differ in colour: the mean red-minus-blue of the fruit separates Golden from Red
    means = [a.images[a.labels == k].float().mean((0, 2, 3)) for k in range(3)]
    assert means[0][1] > means[2][1] + 30  # Golden reflects far more green than Red
    assert not (tmp_path / "a.partial").exists()


def test_images_look_like_the_source(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, 16:48] = (10, 200, 30)  # the centre square survives the centre crop
    Image.fromarray(arr).save(tmp_path / "d" / "c" / "x.png")
    img = load_image_folder(tmp_path / "d", 16).images[0]
    assert img.shape == (3, 16, 16)
    assert img[:, 4:12, 4:12].float().mean((1, 2)).tolist() == pytest.approx([10, 200, 30], abs=2)
