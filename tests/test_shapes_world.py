"""ShapesWorld scene graphs: determinism, layout invariants, validation."""

import numpy as np
import pytest

from cheers.data.shapes.palette import OBJECT_COLORS, SHAPES
from cheers.data.shapes.world import (
    Background,
    Scene,
    ShapeObject,
    TextItem,
    WorldConfig,
    boxes_overlap,
    sample_scene,
)


def test_same_seed_same_scene_and_different_seeds_differ():
    assert sample_scene(7) == sample_scene(7)
    assert sample_scene(7) != sample_scene(8)
    assert len({repr(sample_scene(s)) for s in range(50)}) == 50


def test_scene_dict_round_trip_is_exact():
    for s in range(30):
        scene = sample_scene(s, WorldConfig(text_prob=0.7))
        assert Scene.from_dict(scene.to_dict()) == scene


@pytest.mark.parametrize("seed", range(200))
def test_objects_never_overlap_and_stay_inside(seed):
    scene = sample_scene(seed, WorldConfig(text_prob=0.8))
    boxes = [o.bbox for o in scene.objects]
    for i, a in enumerate(boxes):
        assert 0 < a[0] and a[2] < 1 and 0 < a[1] and a[3] < 1
        for b in boxes[i + 1 :]:
            # At least 12% of a cell (4% of the canvas) between any two objects.
            assert not boxes_overlap(a, b, margin=0.039)
    if scene.text is not None:
        assert all(not boxes_overlap(scene.text.bbox, b, margin=0.0) for b in boxes)
        assert scene.text.cell not in {o.cell for o in scene.objects}
    assert all(o.color != scene.background.color for o in scene.objects)
    assert 1 <= len(scene.objects) <= 4


def test_world_config_limits_vocabulary():
    cfg = WorldConfig(
        shapes=("circle", "square"), colors=("red", "blue"), backgrounds=("white",), max_objects=2
    )
    for s in range(50):
        scene = sample_scene(s, cfg)
        assert {o.shape for o in scene.objects} <= {"circle", "square"}
        assert {o.color for o in scene.objects} <= {"red", "blue"}
        assert len(scene.objects) <= 2 and scene.background.color == "white"


def test_bad_values_raise_with_names():
    with pytest.raises(ValueError, match="hexagon"):
        ShapeObject("hexagon", "red", "small", (0, 0), (0.1, 0.1))
    with pytest.raises(ValueError, match="teal"):
        ShapeObject("circle", "teal", "small", (0, 0), (0.1, 0.1))
    with pytest.raises(ValueError, match="hexagon"):
        WorldConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="share a cell"):
        Scene((ShapeObject("circle", "red", "small", (0, 0), (0.1, 0.1)),) * 2)
    with pytest.raises(ValueError, match="background's colour"):
        Scene((ShapeObject("circle", "white", "small", (0, 0), (0.1, 0.1)),), Background(color="white"))
    with pytest.raises(ValueError, match="does not fit"):
        TextItem("QUIZ", "red", (60, 10))
    with pytest.raises(ValueError, match="'\\?'"):
        TextItem("HI?", "red", (1, 1))


def test_vocabulary_is_used():
    scenes = [sample_scene(s) for s in range(400)]
    assert {o.shape for sc in scenes for o in sc.objects} == set(SHAPES)
    assert {o.color for sc in scenes for o in sc.objects} == set(OBJECT_COLORS)
    cells = np.zeros((3, 3), int)
    for sc in scenes:
        for o in sc.objects:
            cells[o.cell[1], o.cell[0]] += 1
    assert cells.min() > 0.5 * cells.mean()
