"""`Run.predict` checks its inputs where they enter: float images in [0, 1] at the run's size, shape
(B, 1, H, W) or (B, H, W) with B >= 1 (a tensor or a numpy array), positive integer `samples` and
`batch_size`; anything else is one line (UserError) naming the problem. Good inputs of every accepted
form predict the same values."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_runs import tiny_overrides
from vkd_pyro.analysis.runs import load_run
from vkd_pyro.config import config_from_dict
from vkd_pyro.errors import UserError
from vkd_pyro.training.loop import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"
    folder = tmp_path_factory.mktemp("predict-inputs") / "run"
    fit(config_from_dict({}, "tiny", tiny_overrides() + [f"cache_dir={cache}"]), folder, progress=False)
    return load_run(folder)


@pytest.fixture(scope="module")
def images(run):
    """Four float images (4, 1, size, size) in [0, 1], with both ends of the range."""
    size = run.config.data.image_size
    x = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
    return x


def refusal(run, images, **options) -> str:
    """The message of the UserError that `run.predict(images, **options)` raises (one line)."""
    with pytest.raises(UserError) as error:
        run.predict(images, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def predicted(run, images, **options):
    """`run.predict` seeded, so that the Monte Carlo draws of two calls are the same."""
    torch.manual_seed(0)
    return run.predict(images, **options)


def test_the_run_takes_32_pixel_images(run):
    assert run.config.data.image_size == 32  # the sizes below are written for it


@pytest.mark.parametrize("make, expected", [
    (lambda x: (x * 255).to(torch.uint8), "images: a torch.uint8 tensor; scale it to [0, 1] floats, e.g. x.float() / 255"),
    (lambda x: (x * 255).long(), "images: a torch.int64 tensor; scale it to [0, 1] floats, e.g. x.float() / 255"),
    (lambda x: x > 0.5, "images: a torch.bool tensor; scale it to [0, 1] floats, e.g. x.float() / 255"),
    (lambda x: (x.numpy() * 255).astype(np.uint8),
     "images: a numpy uint8 array; scale it to [0, 1] floats, e.g. x.astype(np.float32) / 255"),
    (lambda x: x.to(torch.complex64), "images: a torch.complex64 tensor; predict takes real float images in [0, 1]"),
    (lambda x: np.full(x.shape, "a"), "images: a numpy <U1 array; predict takes float images in [0, 1]"),
])
def test_integer_boolean_and_non_real_images_are_refused(run, images, make, expected):
    assert refusal(run, make(images)) == expected


def with_values(images, value, count):
    """A copy of `images` with its last `count` pixels set to `value`."""
    x = images.clone()
    x.view(-1)[-count:] = value
    return x


@pytest.mark.parametrize("make, expected", [
    (lambda x: x * 255, "images: {n} of 4096 values outside [0, 1] (from 0 to 255); scale them to [0, 1], "
                        "e.g. 8-bit values / 255"),
    (lambda x: with_values(x, -0.5, 3), "images: 3 of 4096 values outside [0, 1] (from -0.5 to 1); scale them to "
                                        "[0, 1], e.g. 8-bit values / 255"),
    (lambda x: with_values(x, 1.001, 1), "images: 1 of 4096 values outside [0, 1] (from 0 to 1.001); scale them to "
                                         "[0, 1], e.g. 8-bit values / 255"),
    (lambda x: with_values(x, float("nan"), 5), "images: 5 NaN and 0 infinite values; predict takes floats in [0, 1]"),
    (lambda x: with_values(x, float("inf"), 2), "images: 0 NaN and 2 infinite values; predict takes floats in [0, 1]"),
    (lambda x: with_values(x, float("nan"), 2).numpy(), "images: 2 NaN and 0 infinite values; predict takes floats "
                                                        "in [0, 1]"),
])
def test_values_outside_the_unit_range_or_not_finite_are_counted(run, images, make, expected):
    n = int((images * 255 > 1).sum())  # the pixels that x * 255 pushes above 1
    assert refusal(run, make(images)) == expected.format(n=n)


@pytest.mark.parametrize("shape, expected", [
    ((4, 1, 16, 16), "images: 16 x 16 pixels; this run takes 32 x 32 (its data.image_size)"),
    ((4, 1, 32, 64), "images: 32 x 64 pixels; this run takes 32 x 32 (its data.image_size)"),
    ((4, 16, 16), "images: 16 x 16 pixels; this run takes 32 x 32 (its data.image_size)"),
    ((0, 1, 32, 32), "images: an empty batch, shape (0, 1, 32, 32)"),
    ((0, 32, 32), "images: an empty batch, shape (0, 32, 32)"),
    ((32, 32), "images: shape (32, 32); predict takes a batch (B, 1, H, W) or (B, H, W) (one image: x[None])"),
    ((2, 1, 1, 32, 32), "images: shape (2, 1, 1, 32, 32); predict takes a batch (B, 1, H, W) or (B, H, W)"),
    ((), "images: shape (); predict takes a batch (B, 1, H, W) or (B, H, W)"),
    ((4, 3, 32, 32), "images: shape (4, 3, 32, 32), 3 channels; predict takes grey images (B, 1, H, W)"),
])
def test_wrong_sizes_shapes_channels_and_empty_batches_are_refused(run, shape, expected):
    assert refusal(run, torch.full(shape, 0.5)) == expected
    assert refusal(run, np.full(shape, 0.5, dtype=np.float32)) == expected  # numpy: the same rules


@pytest.mark.parametrize("option", ["samples", "batch_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4", np.float64(2.0)])
def test_samples_and_batch_size_must_be_positive_integers(run, images, option, value):
    assert refusal(run, images, **{option: value}) == f"{option}: must be a positive integer, got {value!r}"


def test_an_empty_list_of_files_is_refused(run):
    assert refusal(run, []) == "images: an empty list; predict takes image files, folders or glob patterns"


def test_a_multi_page_file_is_refused_naming_it(run, tmp_path):
    pages = [Image.fromarray(np.full((32, 32), value, np.uint8)) for value in (40, 200)]
    path = tmp_path / "two-pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert refusal(run, str(path)) == f"{path}: unsupported image (multi-page TIFF image (2 pages))"


def test_every_accepted_form_predicts_the_same_values(run, images):
    """(B, 1, H, W) and (B, H, W) tensors, float32 and float64 numpy arrays (a reversed view too),
    float16, one image per batch, samples and batch_size as numpy integers; None takes the run's S."""
    expected = predicted(run, images, samples=3)
    assert expected.probability.shape == (4, 14) and expected.samples == 3
    same = [images[:, 0], images.numpy(), images[:, 0].numpy(), images.double().numpy(),
            np.ascontiguousarray(images.numpy()[:, :, ::-1])[:, :, ::-1]]
    for form in same:
        got = predicted(run, form, samples=3)
        assert np.array_equal(got.probability, expected.probability) and np.array_equal(got.std, expected.std)
    got = predicted(run, images, samples=np.int64(3), batch_size=np.int32(4))
    assert np.array_equal(got.probability, expected.probability) and got.samples == 3
    half = predicted(run, images.half(), samples=3)  # rounded to float16: close, not equal
    assert np.abs(half.probability - expected.probability).max() < 0.05
    one_by_one = predicted(run, images, samples=3, batch_size=1)
    assert one_by_one.probability.shape == (4, 14) and (one_by_one.std >= 0).all()
    assert predicted(run, images).samples == run.config.inference.test_samples
