"""Image inputs: which files, how samples are cropped and normalised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cnn_factory import write_images

from ptq.errors import PtqInputError
from ptq.models.image_inputs import (
    ImageInputs,
    default_calibration_images,
    default_eval_images,
    file_digest,
    image_files,
    load_image,
)


def test_default_calibration_and_eval_images_are_disjoint() -> None:
    cal, ev = default_calibration_images(), default_eval_images()
    assert len(cal) >= 20 and ev
    assert {p.parent.name for p in cal} == {"data", "images"}
    assert not {file_digest(p) for p in cal} & {file_digest(p) for p in ev}


def test_samples_central_crop_first_then_seeded_random_crops(tmp_path: Path) -> None:
    files = image_files(write_images(tmp_path / "im", n=3))
    inputs = ImageInputs(size=16, mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))
    x = inputs.samples(files, 7, seed=0)
    assert x.shape == (7, 3, 16, 16)
    img = load_image(files[0])
    h, w = img.shape[1:]
    s = min(h, w)
    centre = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    want = torch.nn.functional.interpolate(centre[None], size=(16, 16), mode="bilinear")[0]
    mean, std = torch.tensor(inputs.mean).view(3, 1, 1), torch.tensor(inputs.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (want - mean) / std)
    assert torch.equal(x, inputs.samples(files, 7, seed=0))
    assert not torch.equal(x[3:], inputs.samples(files, 7, seed=1)[3:])
    assert torch.equal(x[:3], inputs.samples(files, 7, seed=1)[:3])  # central crops


def test_grey_images_become_rgb(tmp_path: Path) -> None:
    files = image_files(write_images(tmp_path / "im", n=3))
    grey = load_image(files[2])
    assert grey.shape[0] == 3 and torch.equal(grey[0], grey[1])


def test_batches_need_a_bound_input_name(tmp_path: Path) -> None:
    files = image_files(write_images(tmp_path / "im", n=2))
    net = torch.nn.Conv2d(3, 4, 3)
    inputs = ImageInputs(size=8)
    with pytest.raises(ValueError, match="bound_to"):
        inputs.batches(files, 3, 0)
    bound = inputs.bound_to(net)
    assert bound.input_name == "input"
    batches = bound.batches(files, 11, 0, batch_size=4)
    assert [b["input"].shape[0] for b in batches] == [4, 4, 3]
    assert ImageInputs.from_dict(bound.to_dict()) == bound


def test_bad_image_folders(tmp_path: Path) -> None:
    with pytest.raises(PtqInputError, match="does not exist"):
        image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(PtqInputError, match="holds no images"):
        image_files(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fake.png").write_text("not a png")
    with pytest.raises(PtqInputError, match="fake.png is not a readable image"):
        ImageInputs(size=8).samples(image_files(tmp_path / "bad"), 1, 0)
    with pytest.raises(PtqInputError, match="3 values each"):
        ImageInputs(mean=(1.0, 2.0), std=(1.0, 1.0, 1.0))  # type: ignore[arg-type]
