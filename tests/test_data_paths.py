"""Data larger than the device or RAM budget: the memory-mapped cache, and batches read from host memory or
from the memmap, which must be the very batches (and so the very training run) of the in-memory path."""
import warnings

import numpy as np
import pytest
import torch

import run_vae
from run_vae import ConfigError, MappedImages, TrainingImages, load_image_folder
from conftest import tiny_config
from test_training import assert_same_weights, weights


def no_decoding(*args):
    pytest.fail("decoded again although a cache holds the images")


def test_a_set_over_the_ram_budget_is_memory_mapped_with_the_same_images(image_folder, tmp_path, monkeypatch):
    in_memory = load_image_folder(image_folder, 16)  # no cache folder: decoded into RAM
    mapped = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=1000)  # 36 images need 27,648
    assert isinstance(mapped.images, MappedImages) and isinstance(in_memory.images, torch.Tensor)
    assert mapped.files == in_memory.files and torch.equal(mapped.labels, in_memory.labels)
    assert torch.equal(mapped.images[:], in_memory.images)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())[0].startswith("memmap_")
    assert not list((tmp_path / "cache").glob("images_*.pt"))  # never held whole in RAM, so never saved so
    monkeypatch.setattr(run_vae, "decode_image", no_decoding)
    again = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=1000)
    assert torch.equal(again.images[:], in_memory.images)
    roomy = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=10 ** 9)  # the mapped cache, read whole
    assert isinstance(roomy.images, torch.Tensor) and torch.equal(roomy.images, in_memory.images)


def test_mapped_views_index_like_tensors_and_subsets_stay_mapped(image_folder, tmp_path):
    full = load_image_folder(image_folder, 16)
    mapped = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=0)
    index = torch.tensor([30, 2, 17, 2])
    assert torch.equal(mapped.images[index], full.images[index])
    assert torch.equal(mapped.images[5], full.images[5]) and torch.equal(mapped.images[3:9], full.images[3:9])
    assert mapped.images.shape == full.images.shape and len(mapped.images) == 36
    train_idx, val_idx = run_vae.split_train_val(36, 0.2, seed=0)
    part = mapped.subset(train_idx)
    assert isinstance(part.images, MappedImages) and part.nbytes == len(train_idx) * 3 * 16 * 16
    assert torch.equal(part.images[torch.tensor([0, 4])], full.images[train_idx[[0, 4]]])
    assert torch.equal(part.images[:], full.subset(train_idx).images)


def test_an_existing_in_memory_cache_is_converted_without_decoding(image_folder, tmp_path, monkeypatch):
    first = load_image_folder(image_folder, 16, tmp_path / "cache")  # within budget: images_*.pt
    monkeypatch.setattr(run_vae, "decode_image", no_decoding)
    mapped = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=0)
    assert isinstance(mapped.images, MappedImages) and torch.equal(mapped.images[:], first.images)


def test_unreadable_files_and_a_damaged_mapped_cache(image_folder, tmp_path):
    (image_folder / "Red" / "broken.jpg").write_bytes(b"not a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=0)
    assert len(data) == 36 and any("broken.jpg" in str(w.message) for w in caught)
    expected = data.images[:]  # read before the file under the mapping is damaged
    raw = next((tmp_path / "cache").glob("memmap_*.uint8"))
    raw.write_bytes(raw.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.warns(UserWarning) as caught:
        rebuilt = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=0)
    assert any(str(w.message).startswith("ignoring unreadable data cache") for w in caught)
    assert torch.equal(rebuilt.images[:], expected)


def epoch_of_batches(images, where, generator_seed=5):
    """Every batch of one shuffled epoch through TrainingImages placed at `where`."""
    g = torch.Generator().manual_seed(generator_seed)
    source = TrainingImages(images.images, images.labels, torch.device("cpu"), where)
    return [source.batch(idx) for idx in run_vae.iterate_batches(len(images), 8, g, device=source.index_device)]


def test_device_host_and_memmap_placements_give_the_same_batches(image_folder, tmp_path):
    in_memory = load_image_folder(image_folder, 16)
    mapped = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=0)
    reference = epoch_of_batches(in_memory, "device")
    for images, where in ((in_memory, "host"), (mapped, "memmap")):
        batches = epoch_of_batches(images, where)
        assert len(batches) == len(reference) == 4
        for (x, y), (rx, ry) in zip(batches, reference):
            assert torch.equal(x, rx) and torch.equal(y, ry) and x.dtype == torch.uint8


@pytest.mark.parametrize("budgets, placement", [({"device_budget": "0"}, "kept in host memory"),
                                                ({"host_budget": 0}, "memory-mapped from memmap_")])
def test_training_through_host_memory_or_the_memmap_equals_the_in_memory_run(tmp_path, image_folder, capsys,
                                                                             budgets, placement):
    extras = {"train": {"epochs": 2}, "data": {"hflip": True}, "model": {"conditional": True}}
    base = tiny_config(tmp_path, image_folder, run={"name": "base"}, **extras)
    run_vae.train(base)
    assert "kept on cpu" in capsys.readouterr().out
    other = tiny_config(tmp_path, image_folder, run={"name": "other"}, **extras)
    other["data"].update(budgets)
    run_vae.train(other)
    assert placement in capsys.readouterr().out  # the choice is printed
    assert_same_weights(weights(tmp_path / "logs/base/last.pt"), weights(tmp_path / "logs/other/last.pt"))


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_budget_is_refused_with_what_it_accepts(tmp_path, image_folder, value):
    with pytest.raises(ConfigError, match=r"data.host_budget must be auto or a number of GiB"):
        tiny_config(tmp_path, image_folder, data={"host_budget": value})


def test_budgets_read_gib_and_auto_shares_the_ram_among_a_machines_processes(tmp_path, image_folder, monkeypatch):
    assert run_vae.parse_budget(0.5, "k") == 2 ** 29 and run_vae.parse_budget("2", "k") == 2 ** 31
    assert run_vae.parse_budget("auto", "k") is None
    budgets = []
    monkeypatch.setattr(run_vae, "available_ram", lambda: 8 * 2 ** 30)
    monkeypatch.setattr(run_vae, "load_image_folder", lambda root, size, cache, budget: budgets.append(budget) or
                        load_image_folder(root, size))
    cfg = tiny_config(tmp_path, image_folder)
    run_vae.load_data(cfg)
    run_vae.load_data(cfg, run_vae.World(rank=1, size=4, local_rank=1, local_size=4))
    assert budgets == [4 * 2 ** 30, 2 ** 30]  # half the available RAM, shared by the 4 processes of a machine


def test_mapped_images_use_the_page_cache_not_a_copy(image_folder, tmp_path):
    mapped = load_image_folder(image_folder, 16, tmp_path / "cache", max_bytes=0).images
    assert isinstance(mapped.array, np.memmap) and not mapped.array.flags.writeable  # read-only, shared pages
