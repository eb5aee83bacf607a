"""Cityscapes / Stanford Dogs loaders on tiny trees written in their real formats; stand-ins."""
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from recon.data.cityscapes import CityscapesSegmentation, labels_to_train_ids
from recon.data.standins import add_gaussian_noise, digit_classification, digit_scenes, stack_items
from recon.data.stanford_dogs import StanfordDogs, read_split_list
from recon.tasks.data import load_task_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_cityscapes(root, split="train", cities=("aachen", "bremen"), h=32, w=64):
    rng = np.random.default_rng(0)
    for ci, city in enumerate(cities):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        stem = f"{city}_000000_00001{ci}"
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        ids = np.zeros((h, w), np.uint8)
        ids[: h // 2] = 7          # road -> 0
        ids[h // 2:, : w // 2] = 26  # car -> 13
        ids[h // 2:, w // 2:] = 1    # ego vehicle -> ignored
        Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        # the colour and instance files of the real layout sit beside it and must be skipped
        Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
    return root


def test_cityscapes_reads_the_real_layout_maps_train_ids_and_resizes(tmp_path):
    root = _write_cityscapes(tmp_path)
    ds = CityscapesSegmentation(root, "train", size=(16, 32))
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 16, 32) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    lab = item["label"]
    assert lab.shape == (16, 32) and lab.dtype == torch.int64
    assert set(torch.unique(lab).tolist()) == {0, 13, 255}
    assert torch.all(lab[:8] == 0) and torch.all(lab[8:, :16] == 13) and torch.all(lab[8:, 16:] == 255)
    data = load_task_data("segmentation", "cityscapes", "train", size=(16, 32), root=str(root))
    assert data["image"].shape == (2, 3, 16, 32) and data["label"].shape == (2, 16, 32)


def test_label_ids_to_train_ids():
    ids = np.array([[0, 7, 8, 33, 34, 255]], dtype=np.uint8)
    assert labels_to_train_ids(ids).tolist() == [[255, 0, 1, 18, 255, 255]]
    with pytest.raises(ValueError, match="integers"):
        labels_to_train_ids(np.array([0.5]))


def test_cityscapes_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="split folder"):
        CityscapesSegmentation(tmp_path, "val")
    root = _write_cityscapes(tmp_path / "a")
    (root / "gtFine" / "train" / "bremen" / "bremen_000000_000011_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="label file"):
        CityscapesSegmentation(root, "train")
    root = _write_cityscapes(tmp_path / "b")
    bad = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000010_leftImg8bit.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="unreadable image file.*aachen_000000_000010"):
        CityscapesSegmentation(root, "train")[0]
    root = _write_cityscapes(tmp_path / "c")
    lab = root / "gtFine" / "train" / "aachen" / "aachen_000000_000010_gtFine_labelIds.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(lab)
    with pytest.raises(ValueError, match="differ"):
        CityscapesSegmentation(root, "train")[0]


def _write_dogs(root, breeds=("n02085620-Chihuahua", "n02085782-Japanese_spaniel"), labels=(1, 2)):
    rng = np.random.default_rng(1)
    files = []
    for b in breeds:
        (root / "Images" / b).mkdir(parents=True)
        for k in range(2):
            name = f"{b}/{b.split('-')[0]}_{100 + k}.jpg"
            Image.fromarray(rng.integers(0, 256, (30 + 10 * k, 40, 3), dtype=np.uint8)).save(root / "Images" / name)
            files.append(name)
    (root / "lists").mkdir()
    for split, sel in (("train", [0, 2]), ("test", [1, 3])):
        fl = np.empty((len(sel), 1), dtype=object)
        for i, j in enumerate(sel):
            fl[i, 0] = np.array([files[j]])
        lab = np.array([[labels[j // 2]] for j in sel], dtype=np.float64)
        scipy.io.savemat(root / "lists" / f"{split}_list.mat",
                         {"file_list": fl, "annotation_list": fl, "labels": lab})
    return root


def test_stanford_dogs_reads_mat_lists_and_crops(tmp_path):
    root = _write_dogs(tmp_path)
    files, labels = read_split_list(root / "lists" / "train_list.mat")
    assert files == ["n02085620-Chihuahua/n02085620_100.jpg", "n02085782-Japanese_spaniel/n02085782_100.jpg"]
    assert labels.tolist() == [0, 1]
    ds = StanfordDogs(root, "test", size=16)
    assert len(ds) == 2 and ds.classes[:2] == ["Chihuahua", "Japanese_spaniel"]
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and int(item["label"]) == 1
    data = load_task_data("classification", "stanford-dogs", "train", size=16, root=str(root))
    assert data["image"].shape == (2, 3, 16, 16) and data["label"].tolist() == [0, 1]


def test_stanford_dogs_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_list.mat"):
        StanfordDogs(tmp_path, "train")
    root = _write_dogs(tmp_path / "a", labels=(1, 121))
    with pytest.raises(ValueError, match="labels out of range"):
        StanfordDogs(root, "train")
    root = _write_dogs(tmp_path / "b")
    (root / "Images" / "n02085620-Chihuahua" / "n02085620_101.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="unreadable image file"):
        StanfordDogs(root, "test")[0]
    with pytest.raises(ValueError, match="split"):
        StanfordDogs(root, "val")


def test_standins_are_seeded_split_and_labelled():
    a = digit_scenes(3, 64, "test", seed=5)
    b = digit_scenes(3, 64, "test", seed=5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (3, 1, 64, 64) and a["label"].shape == (3, 64, 64)
    assert 0 <= int(a["label"].min()) and int(a["label"].max()) <= 10
    on = a["label"] > 0
    assert float(a["image"][:, 0][on].min()) >= 0.3 - 1e-6     # labelled digit pixels are bright
    assert float(a["image"][:, 0][~on].max()) < 0.3 + 1e-6
    c = digit_classification(None, 32, "train")
    t = digit_classification(None, 32, "test")
    assert len(c["label"]) == 1347 and len(t["label"]) == 450 and c["image"].shape[1:] == (1, 32, 32)
    with pytest.raises(ValueError, match="n=5000"):
        digit_classification(5000)


def test_gaussian_noise_is_seeded_with_the_requested_sigma():
    x = torch.zeros(4, 1, 64, 64)
    y = add_gaussian_noise(x, 0.2, seed=3)
    assert torch.equal(y, add_gaussian_noise(x, 0.2, seed=3))
    assert float(y.std()) == pytest.approx(0.2, rel=0.03)
    with pytest.raises(ValueError, match="sigma"):
        add_gaussian_noise(x, -1.0)
    with pytest.raises(ValueError, match="empty"):
        stack_items([])
