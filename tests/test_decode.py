"""The one image decoder (vkd_pyro.data.decode): training and predict see the same tensor for a real
radiograph in every format (8/16-bit PNG, RGB, DICOM with its photometric, rescale and window
attributes), and bad files (bombs, truncated, unsupported) are refused with a reason."""

import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vkd_pyro.analysis.runs import load_images
from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.data import decode
from vkd_pyro.data.decode import BadImage, decode_image
from vkd_pyro.data.records import BadRecords, XRayDataset
from vkd_pyro.errors import UserError

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-radiographs" / "nih_00027426_000.png"
SIZE = 64
STEP = 1 / 255 + 1e-6  # one grey level


@pytest.fixture
def radiograph(tmp_path):
    if not REAL.is_file():
        pytest.skip(f"{REAL} is missing (the real NIH radiograph sits in ../shared/real-radiographs beside the repo)")
    path = tmp_path / "nih.png"
    shutil.copyfile(REAL, path)
    return path


@pytest.fixture
def grey(radiograph):
    return np.asarray(Image.open(radiograph))


def training_tensor(path, tmp_path, size=SIZE):
    """The image as the training path gives it: XRayDataset (decode-once cache, then [0, 1])."""
    records = pd.DataFrame({"record": ["r0"], "path": [str(path)], "group": ["g0"], "view": ["PA"]})
    dataset = XRayDataset("t", records, np.zeros((1, NUM_CLASSES)), None, None, size,
                          tmp_path / "cache", BadRecords("error"))
    return dataset[0]["img"]


def predict_tensor(path, size=SIZE):
    return load_images([str(path)], size)[0]


def test_the_real_radiograph_decodes_identically_for_training_and_predict(radiograph, grey, tmp_path):
    assert grey.dtype == np.uint8 and grey.ndim == 2
    train, predict = training_tensor(radiograph, tmp_path), predict_tensor(radiograph)
    assert train.shape == predict.shape == (1, SIZE, SIZE) and train.dtype == predict.dtype == torch.float32
    assert torch.equal(train, predict)
    expected = np.asarray(Image.fromarray(grey).resize((SIZE, SIZE), Image.BILINEAR)) / np.float32(255)
    assert torch.equal(predict[0], torch.from_numpy(expected.astype(np.float32)))


def test_a_twelve_bit_png_matches_its_eight_bit_rendering(radiograph, grey, tmp_path):
    twelve = np.rint(grey * (4095 / 255)).astype(np.uint16)
    Image.fromarray(twelve).save(tmp_path / "x12.png")
    assert Image.open(tmp_path / "x12.png").mode.startswith("I")  # really stored with 16 bits
    eight = predict_tensor(radiograph)
    for tensor in (predict_tensor(tmp_path / "x12.png"), training_tensor(tmp_path / "x12.png", tmp_path)):
        assert (tensor - eight).abs().max() <= STEP
        assert abs(float(tensor.mean()) - float(eight.mean())) < 0.005  # not the old 91% saturated image


def test_rgb_and_rgba_copies_decode_to_the_grey_image(radiograph, grey, tmp_path):
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)])).save(tmp_path / "rgba.png")
    expected = predict_tensor(radiograph)
    assert torch.equal(predict_tensor(tmp_path / "rgb.png"), expected)
    assert torch.equal(training_tensor(tmp_path / "rgba.png", tmp_path), expected)
    colour = np.dstack([grey, grey // 2, 255 - grey])  # a real colour image: Pillow's luma
    Image.fromarray(colour).save(tmp_path / "colour.png")
    luma = Image.fromarray(colour).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
    assert np.array_equal(decode_image(tmp_path / "colour.png", SIZE), np.asarray(luma))


# DICOM ---------------------------------------------------------------------------------------------


def write_dicom(path, stored, photometric="MONOCHROME2", bits_stored=8, **attributes):
    """A single-frame grey DICOM (explicit VR little endian) holding `stored` (uint8 or uint16)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)  # pydicom 2
    return path


def png_tensor(array, tmp_path, name):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp_path / name)
    return predict_tensor(tmp_path / name)


def test_dicom_monochrome2_and_monochrome1_decode_as_the_png(radiograph, grey, tmp_path):
    expected = predict_tensor(radiograph)
    plain = write_dicom(tmp_path / "m2.dcm", grey)
    inverted = write_dicom(tmp_path / "m1.dcm", 255 - grey, photometric="MONOCHROME1")
    assert torch.equal(predict_tensor(plain), expected)
    assert torch.equal(training_tensor(plain, tmp_path), expected)
    assert torch.equal(predict_tensor(inverted), expected)  # MONOCHROME1: bone is dark in the file
    no_suffix = tmp_path / "IM0001"  # found by its DICM preamble, whatever its name
    shutil.copyfile(plain, no_suffix)
    assert torch.equal(predict_tensor(no_suffix), expected)


def test_dicom_bits_stored_scales_twelve_bit_data(radiograph, grey, tmp_path):
    twelve = np.rint(grey * (4095 / 255)).astype(np.uint16)
    path = write_dicom(tmp_path / "x12.dcm", twelve, bits_stored=12)
    assert (predict_tensor(path) - predict_tensor(radiograph)).abs().max() <= STEP


def test_dicom_rescale_slope_and_intercept_are_applied(grey, tmp_path):
    # Modality values = -1 * stored + 255: a negative slope shows the stored image inverted.
    path = write_dicom(tmp_path / "r.dcm", grey.astype(np.uint16), RescaleSlope=-1, RescaleIntercept=255)
    assert torch.equal(predict_tensor(path), png_tensor(255 - grey, tmp_path, "inverted.png"))


def test_dicom_window_is_applied_in_rescaled_units(grey, tmp_path):
    slope, intercept, center, width = 2.0, -1024.0, -768.0, 256.0  # the window covers stored 64..192
    path = write_dicom(tmp_path / "w.dcm", grey.astype(np.uint16), RescaleSlope=slope, RescaleIntercept=intercept,
                       WindowCenter=center, WindowWidth=width)
    x = grey * slope + intercept  # DICOM PS3.3 C.11.2.1.2.1, linear window, output scaled to 0..1
    fraction = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    fraction[x <= center - 0.5 - (width - 1) / 2] = 0.0
    fraction[x > center - 0.5 + (width - 1) / 2] = 1.0
    expected = png_tensor(np.rint(fraction * 255), tmp_path, "windowed.png")
    got = predict_tensor(path)
    assert (got - expected).abs().max() <= STEP
    assert float((got == 0).float().mean()) > 0.05 and float((got == 1).float().mean()) > 0.05  # clipped both ends


def test_dicom_without_pydicom_is_one_line_saying_what_to_install(grey, tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "m2.dcm", grey)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now fails
    with pytest.raises(UserError) as error:
        load_images([str(path)], SIZE)
    assert str(error.value) == f"{path}: a DICOM file; reading DICOM needs pydicom: pip install vkd-pyro[dicom]"


def test_bad_dicoms_are_bad_images(grey, tmp_path):
    path = write_dicom(tmp_path / "t.dcm", grey)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(BadImage) as error:
        decode_image(path, SIZE)
    assert error.value.reason == decode.UNREADABLE
    bomb = write_dicom(tmp_path / "bomb.dcm", grey[:4, :4])
    import pydicom

    ds = pydicom.dcmread(bomb)
    ds.Rows = ds.Columns = 65535  # the header claims 4.3 gigapixels; the data is 16 bytes
    ds.save_as(bomb)
    with pytest.raises(BadImage) as error:
        decode_image(bomb, SIZE)
    assert error.value.reason == decode.TOO_LARGE and "65535 x 65535" in error.value.detail


# Bad files -------------------------------------------------------------------------------------------


def png_claiming(width, height):
    """A small PNG file whose header declares width x height pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_decompression_bombs_are_refused_before_decoding(radiograph, tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    assert bomb.stat().st_size < 200
    with pytest.raises(BadImage) as error:
        decode_image(bomb, SIZE)
    assert error.value.reason == decode.TOO_LARGE
    with pytest.raises(UserError, match=f"^{bomb}: image too large"):
        load_images([str(bomb)], SIZE)
    # Between Pillow's warning (MAX_IMAGE_PIXELS) and its error (twice that): refused by our check.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 - 1)
    with pytest.raises(BadImage) as error:
        decode_image(radiograph, SIZE)
    assert error.value.reason == decode.TOO_LARGE and "512 x 512 pixels" in error.value.detail


def test_truncated_and_missing_files(radiograph, tmp_path):
    cut = tmp_path / "cut.png"
    cut.write_bytes(radiograph.read_bytes()[: radiograph.stat().st_size // 2])
    with pytest.raises(BadImage) as error:
        decode_image(cut, SIZE)
    assert error.value.reason == decode.UNREADABLE
    with pytest.raises(UserError) as error:
        load_images([str(radiograph), str(cut)], SIZE)
    message = str(error.value)
    assert message.startswith(f"{cut}: unreadable image (corrupt or truncated) (") and "\n" not in message
    with pytest.raises(UserError, match=f"^{tmp_path / 'none.png'}: image not found$"):
        load_images([str(tmp_path / "none.png")], SIZE)


def test_a_bad_file_follows_the_dataset_policy(radiograph, tmp_path):
    cut = tmp_path / "cut.png"
    cut.write_bytes(radiograph.read_bytes()[:300])
    records = pd.DataFrame({"record": ["good", "bad"], "path": [str(radiograph), str(cut)],
                            "group": ["g0", "g1"], "view": ["PA", "PA"]})
    bad = BadRecords("skip")
    dataset = XRayDataset("t", records, np.zeros((2, NUM_CLASSES)), None, None, SIZE, tmp_path / "c", bad)
    assert len(dataset) == 1 and dataset.skipped == {decode.UNREADABLE: 1}
    assert torch.equal(dataset[0]["img"], predict_tensor(radiograph))



# Multi-page files ----------------------------------------------------------------------------------


def write_pages(path, pages):
    """A file of `pages` 8 x 8 grey pages (frames), the first one grey level 40: a TIFF, GIF or
    (animated) PNG written by Pillow, or a DICOM (NumberOfFrames and the PixelData of every frame)."""
    if path.suffix == ".dcm":
        write_dicom(path, np.full((8, 8), 40, np.uint8))
        if pages > 1:
            import pydicom

            ds = pydicom.dcmread(path)
            ds.NumberOfFrames = pages
            ds.PixelData = ds.PixelData * pages
            ds.save_as(path)
        return path
    images = [Image.fromarray(np.full((8, 8), 40 + 80 * i, np.uint8)) for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


@pytest.mark.parametrize("suffix, pages, detail", [
    (".tif", 2, "multi-page TIFF image (2 pages)"),
    (".tiff", 3, "multi-page TIFF image (3 pages)"),
    (".gif", 2, "multi-page GIF image (2 pages)"),
    (".png", 2, "multi-page PNG image (2 pages)"),  # an animated PNG
    (".dcm", 2, "multi-frame DICOM (2 frames)"),
])
def test_multi_page_images_are_refused_naming_the_file(tmp_path, suffix, pages, detail):
    """Training and predict refuse a file of several pages or frames alike (which page is the
    radiograph is not guessed): a BadImage 'unsupported image', in predict one line naming the file,
    in a dataset a record skipped under that reason; one page of the same format decodes."""
    path = write_pages(tmp_path / f"several{suffix}", pages)
    with pytest.raises(BadImage) as error:
        decode_image(path, SIZE)
    assert (error.value.reason, error.value.detail) == (decode.UNSUPPORTED, detail)
    with pytest.raises(UserError) as error:
        load_images([str(path)], SIZE)
    assert str(error.value) == f"{path}: unsupported image ({detail})"
    single = write_pages(tmp_path / f"one{suffix}", 1)
    records = pd.DataFrame({"record": ["one", "several"], "path": [str(single), str(path)],
                            "group": ["g0", "g1"], "view": ["PA", "PA"]})
    bad = BadRecords("skip")
    dataset = XRayDataset("t", records, np.zeros((2, NUM_CLASSES)), None, None, SIZE, tmp_path / "c", bad)
    assert len(dataset) == 1 and dataset.skipped == {decode.UNSUPPORTED: 1}
    assert torch.equal(dataset[0]["img"], predict_tensor(single))
    assert torch.equal(dataset[0]["img"], torch.from_numpy(decode.to_unit_float(np.full((1, SIZE, SIZE), 40, np.uint8))))
