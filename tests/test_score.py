"""The shapes scorer recovers every colour, shape, position, size and background of drawn images."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmdit.data import shapes
from mmdit.score import analyze_image, expected_from_name, main, score_images

BACKGROUNDS = list(shapes.BACKGROUNDS)


@pytest.mark.parametrize("width,height", [(64, 64), (48, 80), (80, 48)])
def test_every_attribute_on_drawn_images(width, height):
    rng = np.random.default_rng(0)
    combos = itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS, shapes.SIZES)
    for i, (colour, shape, position, size) in enumerate(combos):
        spec = shapes.ShapeSpec(shape, colour, position, size, BACKGROUNDS[i % len(BACKGROUNDS)])
        report = analyze_image(shapes.draw_shape(spec, width, height, rng))
        assert report.found
        assert report.attributes() == {"colour": colour, "shape": shape, "position": position, "size": size,
                                       "background": spec.background}, spec


def test_input_formats_and_mild_noise():
    spec = shapes.ShapeSpec("triangle", "purple", "right", "large", "white")
    image = shapes.draw_shape(spec, 64, 64)
    array = np.asarray(image)
    expected = {"colour": "purple", "shape": "triangle", "position": "right", "size": "large", "background": "white"}
    assert analyze_image(array).attributes() == expected
    assert analyze_image(array / 255.0).attributes() == expected  # float in [0, 1]
    assert analyze_image(array.transpose(2, 0, 1)).attributes() == expected  # CHW
    rng = np.random.default_rng(0)
    right = 0
    specs = [shapes.ShapeSpec(s, c, p, "large", b) for s, c, p, b in itertools.product(
        shapes.SHAPES, shapes.COLOURS, ("left", "center", "bottom"), ("black", "light gray"))]
    for spec in specs:
        blurred = np.asarray(shapes.draw_shape(spec, 64, 64, rng).filter(ImageFilter.GaussianBlur(1.0)), float)
        noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
        right += analyze_image(noisy).attributes() == {"colour": spec.colour, "shape": spec.shape,
                                                       "position": spec.position, "size": "large",
                                                       "background": spec.background}
    assert right / len(specs) >= 0.95


def test_blank_image_has_no_shape():
    report = analyze_image(Image.new("RGB", (32, 32), (40, 40, 40)))
    assert not report.found and report.colour == "none"


def test_score_images_accuracy_and_holdout_split():
    def item(colour, shape, claimed_colour=None):
        image = shapes.draw_shape(shapes.ShapeSpec(shape, colour, "center", "large", "black"), 48, 48)
        return image, {"colour": claimed_colour or colour, "shape": shape, "position": "center"}

    items = [item("red", "circle"), item("green", "square"), item("green", "square", "blue"),
             item("orange", "triangle")]
    scores = score_images(items, holdout=[("red", "circle")])
    assert scores["n"] == 4 and scores["found"] == 1.0
    assert scores["colour"] == 0.75 and scores["shape"] == 1.0 and scores["position"] == 1.0
    assert scores["all"] == 0.75 and "size" not in scores
    assert scores["held_out"]["n"] == 1 and scores["held_out"]["all"] == 1.0
    assert scores["seen"]["n"] == 3 and scores["seen"]["colour"] == pytest.approx(2 / 3)


def test_expected_from_name():
    assert expected_from_name("step100_red_circle_left_large_03.png") == {
        "colour": "red", "shape": "circle", "position": "left", "size": "large"}


def test_main_scores_a_folder(tmp_path, capsys):
    specs = [shapes.ShapeSpec("circle", "blue", "top", "small", "white"),
             shapes.ShapeSpec("square", "yellow", "left", "large", "dark gray")]
    for i, spec in enumerate(specs):
        shapes.draw_shape(spec, 64, 48).save(tmp_path / f"{spec.colour}_{spec.shape}_{spec.position}_{i}.png")
    shapes.draw_shape(specs[0], 64, 48).save(tmp_path / "sample.png")
    (tmp_path / "expected.json").write_text(json.dumps({"sample.png": {"colour": "red", "shape": "circle"}}))
    assert main([str(tmp_path), "--holdout", "none", "--output", str(tmp_path / "scores.json")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 3 and scores["shape"] == 1.0 and scores["colour"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert main([str(tmp_path / "nothing")]) == 2
