"""Loaders against the official on-disk formats, on tiny trees the tests write: Stanford Dogs
lists where ``lists.tar`` unpacks them, Cityscapes labels aligned with the resized image, and
DICOM files of other modalities, DICOMDIR indexes, Enhanced CT, padding and broken tags."""
import re
import shutil

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from recon.data.cityscapes import CityscapesSegmentation
from recon.data.ct_datasets import DicomSliceDataset
from recon.data.dicom import check_dicom_file, example_ct_path, find_dicom_files, read_dicom_slice
from recon.data.stanford_dogs import StanfordDogs, find_split_list
from recon.operators import ParallelBeamGeometry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- Stanford Dogs ------------------------------------------------------------------------------
BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel")


def _mat_list(path, files, labels):
    cells = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cells[i, 0] = np.array([f])
    scipy.io.savemat(path, {"file_list": cells, "annotation_list": cells,
                            "labels": np.array([[v] for v in labels], dtype=np.float64)})


def _write_dogs(root, lists_dir):
    """Images/ as images.tar unpacks it; the three lists as lists.tar does (or under lists/)."""
    rng = np.random.default_rng(2)
    files, labels = [], []
    for c, breed in enumerate(BREEDS):
        (root / "Images" / breed).mkdir(parents=True)
        for k in range(3):
            name = f"{breed}/{breed.split('-')[0]}_{10 + k}.jpg"
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "Images" / name)
            files.append(name)
            labels.append(c + 1)
    where = root / lists_dir
    where.mkdir(exist_ok=True)
    train = [0, 1, 3, 4]
    test = [2, 5]
    _mat_list(where / "file_list.mat", files, labels)
    _mat_list(where / "train_list.mat", [files[i] for i in train], [labels[i] for i in train])
    _mat_list(where / "test_list.mat", [files[i] for i in test], [labels[i] for i in test])
    return root


@pytest.mark.parametrize("lists_dir", [".", "lists"])
def test_stanford_dogs_finds_the_lists_at_the_root_or_under_lists(tmp_path, lists_dir):
    root = _write_dogs(tmp_path, lists_dir)
    train, test = StanfordDogs(root, "train", size=8), StanfordDogs(root, "test", size=8)
    assert (len(train), len(test)) == (4, 2)
    assert train.list_file.samefile(root / lists_dir / "train_list.mat")
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    assert train.classes[:2] == ["Chihuahua", "Japanese_spaniel"]
    assert test[1]["image"].shape == (3, 8, 8)
    assert find_split_list(root, "file").name == "file_list.mat"


def test_stanford_dogs_errors_name_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_list\.mat.*lists.*lists\.tar"):
        StanfordDogs(tmp_path, "train")
    root = _write_dogs(tmp_path / "a", ".")
    (root / "test_list.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ValueError, match=r"unreadable Stanford Dogs list file.*test_list\.mat"):
        StanfordDogs(root, "test")
    (root / "Images" / BREEDS[0] / "n02085620_10.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"n02085620_10\.jpg.*train_list\.mat"):
        StanfordDogs(root, "train")[0]


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "3"])
def test_loaders_refuse_a_max_items_that_is_not_a_positive_int(tmp_path, bad):
    root = _write_dogs(tmp_path / "dogs", ".")
    with pytest.raises(ValueError, match=r"max_items must be None .* positive int, got"):
        StanfordDogs(root, "train", max_items=bad)
    with pytest.raises(ValueError, match=r"max_items must be None .* positive int, got"):
        CityscapesSegmentation(tmp_path / "no-such-root", "train", max_items=bad)
    assert len(StanfordDogs(root, "train", max_items=2)) == 2


# ----- Cityscapes --------------------------------------------------------------------------------
def _write_city(root, image, ids, split="train", city="aachen", stem="aachen_000000_000019"):
    (root / "leftImg8bit" / split / city).mkdir(parents=True)
    (root / "gtFine" / split / city).mkdir(parents=True)
    Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    lab = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
    Image.fromarray(ids).save(lab)
    return lab


def test_cityscapes_labels_stay_aligned_with_the_resized_image(tmp_path):
    # a car (id 26 -> train id 13) on the road (id 7 -> 0); the car is bright in the image. Its
    # edges (row 18, column 34) cut output pixels of an 8x downscale 6/8 of the way through, so
    # those output pixels are mostly car: a label sampled at the pixel centre says car, one
    # sampled at the top-left corner (plain "nearest") says road.
    h, w, f = 64, 128, 8
    car = np.zeros((h, w), bool)
    car[18:, 34:] = True
    ids = np.where(car, 26, 7).astype(np.uint8)
    image = np.repeat(np.where(car, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    _write_city(tmp_path, image, ids)
    item = CityscapesSegmentation(tmp_path, "train", size=(h // f, w // f))[0]
    bright = item["image"][0] > 0.5
    assert torch.equal(item["label"] == 13, bright)             # every pixel agrees
    assert int((item["label"] == 13).sum()) == (8 - 2) * (16 - 4)
    corner = F.interpolate(torch.from_numpy(car)[None, None].float(), size=(h // f, w // f),
                           mode="nearest")[0, 0] > 0
    assert int((corner != bright).sum()) == 6 + 12 - 1          # the test tells the two apart


def test_cityscapes_label_errors_name_the_file(tmp_path):
    ids = np.full((8, 16), 26001, dtype=np.uint16)               # an instance-id map, 16 bit
    lab = _write_city(tmp_path, np.zeros((8, 16, 3), np.uint8), ids)
    with pytest.raises(ValueError, match=rf"label file '{re.escape(str(lab))}'.*label ids"):
        CityscapesSegmentation(tmp_path, "train", size=(8, 16))[0]


# ----- DICOM -------------------------------------------------------------------------------------
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import EnhancedCTImageStorage, MRImageStorage  # noqa: E402


def _ct():
    return pydicom.dcmread(example_ct_path())


def _reference_hu():
    ds = _ct()
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _save(ds, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_other_modalities_are_refused_naming_the_file_unless_asked_for(tmp_path):
    mr = _ct()
    mr.Modality, mr.SOPClassUID = "MR", MRImageStorage
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    path = _save(mr, tmp_path / "series" / "mr.dcm")
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' has modality 'MR' \(MR Image Storage\), "
                                         r"not one of \['CT'\].*modalities=\('CT', 'MR'\)"):
        read_dicom_slice(path)
    assert read_dicom_slice(path, modalities=("CT", "MR")).meta["Modality"] == "MR"
    assert read_dicom_slice(path, modalities=None).hu.shape == (128, 128)
    shutil.copy(example_ct_path(), tmp_path / "series" / "ct.dcm")
    geom = ParallelBeamGeometry((16, 16), 8)
    with pytest.raises(ValueError, match=r"mr\.dcm' has modality 'MR'"):
        DicomSliceDataset(tmp_path / "series", geom)      # refused before any pixels are read
    assert len(DicomSliceDataset(tmp_path / "series", geom, modalities=["ct", "MR"])) == 2
    with pytest.raises(TypeError, match="`modalities`"):
        read_dicom_slice(path, modalities=3)


@pytest.mark.parametrize("name, modality", [("MR_small.dcm", "MR"), ("rtdose_1frame.dcm", "RTDOSE"),
                                            ("liver_1frame.dcm", "SEG")])
def test_real_files_of_other_modalities_are_refused(tmp_path, name, modality):
    path = shutil.copy(get_testdata_file(name), tmp_path / name)
    with pytest.raises(ValueError, match=rf"{name}' has modality '{modality}'"):
        read_dicom_slice(path)
    with pytest.raises(ValueError, match=rf"{name}' has modality '{modality}'"):
        check_dicom_file(path)


def test_a_dicomdir_folder_as_copied_from_a_cd_reads_its_images(tmp_path):
    from pydicom.fileset import FileSet

    fs = FileSet()
    for k in (1, 2):
        ds = _ct()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k
        fs.add(ds)
    fs.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    files = find_dicom_files(tmp_path / "cd")
    assert len(files) == 2 and all(f.name != "DICOMDIR" for f in files)
    data = DicomSliceDataset(tmp_path / "cd", ParallelBeamGeometry((16, 16), 8))
    assert len(data) == 2 and data[1]["image"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"DICOMDIR' is a DICOMDIR"):
        read_dicom_slice(tmp_path / "cd" / "DICOMDIR")
    with pytest.raises(ValueError, match=r"DICOMDIR' is a DICOMDIR"):
        DicomSliceDataset([tmp_path / "cd" / "DICOMDIR"], ParallelBeamGeometry((16, 16), 8))


def _group(**tags):
    item = Dataset()
    for k, v in tags.items():
        setattr(item, k, v)
    return item


@pytest.mark.parametrize("groups", ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"])
def test_single_frame_enhanced_ct_takes_its_rescale_from_the_functional_groups(tmp_path, groups):
    ds = _ct()
    raw = ds.pixel_array.astype(np.uint16)             # Enhanced CT stores unsigned values
    slope, intercept, spacing = ds.RescaleSlope, ds.RescaleIntercept, list(ds.PixelSpacing)
    for tag in ("RescaleSlope", "RescaleIntercept", "PixelSpacing", "PixelPaddingValue"):
        delattr(ds, tag)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames, ds.PixelRepresentation = 1, 0
    ds.PixelData = raw.tobytes()
    fg = _group(PixelValueTransformationSequence=Sequence([_group(
        RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="HU")]),
        PixelMeasuresSequence=Sequence([_group(PixelSpacing=spacing, SliceThickness=1.0)]))
    setattr(ds, groups, Sequence([fg]))
    sl = read_dicom_slice(_save(ds, tmp_path / "enhanced.dcm"))
    np.testing.assert_array_equal(sl.hu, _reference_hu().astype(np.float32))
    assert float(intercept) == -1024.0                  # ignoring the group would read +1024 HU
    assert sl.pixel_spacing == (float(spacing[0]), float(spacing[1]))


def test_padding_value_and_range_limit_are_air(tmp_path):
    ds = _ct()
    arr = ds.pixel_array.copy()
    arr[:4] = 100                 # padding band 100..120 (stored values)
    arr[4:8] = 120
    arr[8:10] = 121               # just outside the range: kept
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 120
    ds.add_new(0x00280121, "SS", 100)                   # Pixel Padding Range Limit
    hu = read_dicom_slice(_save(ds, tmp_path / "pad.dcm")).hu
    assert np.all(hu[:8] == -1000.0) and np.all(hu[8:10] == 121 - 1024.0)
    assert np.array_equal(hu[10:], _reference_hu()[10:].astype(np.float32))


def test_an_unsigned_padding_value_on_signed_pixels_is_masked(tmp_path):
    ds = _ct()
    arr = ds.pixel_array.copy()
    arr[:5] = -2000
    ds.PixelData = arr.tobytes()
    del ds.PixelPaddingValue
    ds.add_new(0x00280120, "US", 65536 - 2000)          # -2000 written as US (63536)
    path = _save(ds, tmp_path / "us_pad.dcm")
    assert pydicom.dcmread(path).PixelPaddingValue == 63536 and ds.PixelRepresentation == 1
    hu = read_dicom_slice(path).hu
    assert np.all(hu[:5] == -1000.0) and np.array_equal(hu[5:], _reference_hu()[5:].astype(np.float32))


def _broken(tmp_path, name, change):
    ds = _ct()
    change(ds)
    return _save(ds, tmp_path / name)


@pytest.mark.parametrize("name, change, pattern", [
    ("zero_slope.dcm", lambda ds: setattr(ds, "RescaleSlope", 0), r"RescaleSlope is 0"),
    ("empty_slope.dcm", lambda ds: setattr(ds, "RescaleSlope", ""), r"RescaleSlope is present but empty"),
    ("truncated.dcm", lambda ds: setattr(ds, "PixelData", ds.PixelData[:-100]),
     r"pixel data cannot be read \(truncated"),
    ("one_spacing.dcm", lambda ds: setattr(ds, "PixelSpacing", 0.5),
     r"PixelSpacing must hold two positive numbers"),
    ("neg_spacing.dcm", lambda ds: setattr(ds, "PixelSpacing", [0.5, -0.5]),
     r"PixelSpacing must hold two positive numbers"),
    ("no_pixels.dcm", lambda ds: delattr(ds, "PixelData"), r"has no pixel data"),
])
def test_broken_tags_give_errors_that_name_the_file(tmp_path, name, change, pattern):
    path = _broken(tmp_path, name, change)
    with pytest.raises(ValueError, match=rf"`path` '{re.escape(str(path))}'.*{pattern}"):
        read_dicom_slice(path)


def test_a_missing_decoder_is_named_with_the_file(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.Modality = "CT"
    path = _save(ds, tmp_path / "jpeg_ls.dcm")
    try:
        pydicom.dcmread(path).pixel_array
    except Exception:
        pass
    else:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(ValueError, match=rf"`path` '{re.escape(str(path))}': no installed decoder .*JPEG-LS"):
        read_dicom_slice(path)


def test_a_multi_frame_file_is_refused_naming_the_file(tmp_path):
    ds = _ct()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    path = _save(ds, tmp_path / "two_frames.dcm")
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' holds 2 frames; expected one"):
        read_dicom_slice(path)
