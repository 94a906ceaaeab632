"""ciae_core.synth_depth: the 3-D world behind a synthetic scene is consistent with its id map."""

import numpy as np
import pytest

from ciae_core.depth import SegmentDepth
from ciae_core.synth import SYNTH_CATEGORIES, SceneSequence, render_scene
from ciae_core.synth_depth import (SynthCamera, SynthDepthError, geometry_errors, render_depth, segment_truth,
                                   simulate_sensor)

NAMES = {c.id: c.name for c in SYNTH_CATEGORIES}


def _scene(seed, h=240, w=320, **kw):
    _, pan, info = render_scene((seed, 5), h, w, **kw)
    return pan, info, render_depth(pan, info)


def _class_masks(pan, info):
    by_name = {"sky": [], "wall": [], "ground": [], "thing": []}
    for s in info:
        by_name[NAMES[s["category_id"]] if not s["isthing"] else "thing"].append(s["id"])
    return {k: np.isin(pan, v) for k, v in by_name.items()}


def test_camera_intrinsics():
    cam = SynthCamera(480, 640)
    k = cam.K()
    assert k[0, 0] == k[1, 1] == pytest.approx(320 / np.tan(np.radians(34.5)))
    assert (k[0, 2], k[1, 2]) == (319.5, pytest.approx(0.3 * 479))
    assert cam.ground_depth(k[1, 2] + k[1, 1]) == pytest.approx(1.0)  # 45 deg down: Z = camera height


@pytest.mark.parametrize("seed", range(6))
def test_stuff_surfaces(seed):
    pan, info, r = _scene(seed)
    m = _class_masks(pan, info)
    k, cam = r.K, r.camera
    v, u = np.mgrid[0:pan.shape[0], 0:pan.shape[1]]
    d = r.depth.astype(np.float64)
    # sky: no return
    assert np.isposinf(d[m["sky"]]).all()
    # ground: on the plane y = camera height (Eq. 1)
    if m["ground"].any():
        y = (v[m["ground"]] - k[1, 2]) * d[m["ground"]] / k[1, 1]
        np.testing.assert_allclose(y, cam.camera_height, rtol=1e-5)
    # wall: vertical (one depth per column), standing on the ground behind every ground pixel
    if m["wall"].any():
        wall = np.where(m["wall"], d, np.nan)
        cols = np.flatnonzero(m["wall"].any(0))
        assert np.allclose(np.nanmax(wall[:, cols], 0), np.nanmin(wall[:, cols], 0), rtol=1e-6)
        ground = np.where(m["ground"], d, -np.inf)
        assert (ground.max(0)[cols] <= np.nanmin(wall[:, cols], 0) * (1 + 1e-6)).all()
    assert np.isfinite(d[~m["sky"]]).all() and (d[~m["sky"]] > 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_things_are_plates_in_painter_order(seed):
    pan, info, r = _scene(seed)
    m = _class_masks(pan, info)
    v, u = np.mgrid[0:pan.shape[0], 0:pan.shape[1]]
    cam, b = r.camera, r.boundary
    # what each pixel's ray would meet without things: ground in front of the wall base, else wall
    behind = np.where(v >= b[None, :], cam.ground_depth(np.maximum(v, cam.cy + 1e-6)), cam.ground_depth(b)[None, :])
    things = [s["id"] for s in info if s["isthing"]]
    assert sorted(r.thing_depth) == things
    for tid in things:
        z = r.depth[pan == tid]
        assert np.all(z == np.float32(r.thing_depth[tid]))  # fronto-parallel plate
        assert (r.thing_depth[tid] <= behind[pan == tid] * (1 + 1e-6)).all()  # in front of the stuff
        if tid in r.standing:  # its lowest row touches the ground plane
            v_bottom = v[pan == tid].max()
            assert (v_bottom - cam.cy) * r.thing_depth[tid] / cam.focal == pytest.approx(cam.camera_height)
    # touching things: the later one (painted over the earlier) is nearer
    t = np.where(m["thing"], pan, 0)
    for a, c in ((t[:, :-1], t[:, 1:]), (t[:-1, :], t[1:, :]), (t[:-1, :-1], t[1:, 1:]), (t[:-1, 1:], t[1:, :-1])):
        sel = (a != c) & (a > 0) & (c > 0)
        for i, j in set(zip(a[sel].tolist(), c[sel].tolist())):
            early, late = min(i, j), max(i, j)
            assert r.thing_depth[late] < r.thing_depth[early]


def test_some_things_stand_and_some_float():
    standing = floating = 0
    for seed in range(6):
        _, _, r = _scene(seed)
        standing += len(r.standing)
        floating += len(r.thing_depth) - len(r.standing)
    assert standing > 0 and floating > 0


def test_truth_equals_the_estimator_on_exact_depth():
    """The slow per-segment truth and the vectorised estimator agree when nothing disturbs them."""
    pan, info, r = _scene(1, 480, 640)
    est = SegmentDepth(erosion=0, sample_stride=1, compensate_erosion=False, min_points=1)
    got = est(pan, r.depth, r.K, ids=r.truth.ids)
    np.testing.assert_array_equal(got.points, r.truth.points)
    np.testing.assert_array_equal(got.has_3d, r.truth.has_3d)
    for name in ("centroid", "size", "min_distance"):
        np.testing.assert_allclose(getattr(got, name), getattr(r.truth, name), atol=2e-5, equal_nan=True)
    errors = geometry_errors(got, r.truth)
    assert errors["lost"].size == 0 and errors["centroid"].max() < 1e-5
    sky = [s["id"] for s in info if NAMES[s["category_id"]] == "sky"]
    assert not r.truth.has_3d[np.isin(r.truth.ids, sky)].any()


def test_truth_respects_the_depth_range():
    pan, info, r = _scene(2)
    near = segment_truth(r.depth, pan, r.K, max_depth=2.0)
    for i, sid in enumerate(near.ids.tolist()):
        z = r.depth[pan == sid]
        assert near.points[i] == int(((z >= 0.1) & (z <= 2.0)).sum())


def test_void_seams_get_the_surrounding_surfaces():
    _, pan, info = render_scene((3, 5), 240, 320, void_border=2)
    assert (pan == 0).any()
    r = render_depth(pan, info)
    seams = pan == 0
    assert np.isfinite(r.depth[seams]).mean() > 0.5  # next to sky some stay inf: they see the sky
    assert 0 not in r.truth.ids.tolist()


def test_sequence_frames_and_determinism():
    seq = SceneSequence(4, 240, 320)
    for t in (0, 5, 10):
        _, pan, info = seq.frame(t)
        a, b = render_depth(pan, info), render_depth(pan, info)
        np.testing.assert_array_equal(a.depth, b.depth)
        assert set(a.thing_depth) == {s["id"] for s in info if s["isthing"]}


def test_ground_above_the_horizon_is_refused():
    _, pan, info = render_scene((0, 5), 240, 320)
    with pytest.raises(SynthDepthError, match="horizon"):
        render_depth(pan, info, SynthCamera(240, 320, horizon=0.9))
    with pytest.raises(SynthDepthError):
        render_depth(pan, info, SynthCamera(120, 320))


def test_sensor_model():
    pan, info, r = _scene(0, 480, 640)
    clean = simulate_sensor(r.depth, 0, noise=0.0)
    noisy = simulate_sensor(r.depth, 0)
    np.testing.assert_array_equal(noisy, simulate_sensor(r.depth, 0))  # deterministic in the seed
    # registration shift of 0.5 px: every depth is a mix of 2x2 exact depths, NaN next to the sky
    d = r.depth.astype(np.float64)
    nb = np.stack([d[:-1, :-1], d[1:, :-1], d[:-1, 1:], d[1:, 1:]])
    inner = clean[:-1, :-1]
    finite = np.isfinite(nb).all(0)
    assert np.isnan(inner[~finite]).all()
    # fattening pulls edge pixels nearer, never farther than the farthest neighbour
    assert (inner[finite] <= nb.max(0)[finite] * (1 + 1e-5)).all()
    # noise: sigma = 0.005 Z^2 on flat parts (plates)
    both = np.isfinite(noisy) & np.isfinite(clean)
    rel = (noisy[both] - clean[both]) / (0.005 * clean[both] ** 2)
    assert abs(rel.std() - 1.0) < 0.05 and abs(rel.mean()) < 0.05


def test_geometry_errors_reports_lost_segments():
    pan, info, r = _scene(0)
    est = SegmentDepth(min_points=10 ** 9)  # nothing has enough points
    e = geometry_errors(est(pan, r.depth, r.K, ids=r.truth.ids), r.truth)
    assert e["centroid"].size == 0 and e["lost"].size == int(r.truth.has_3d.sum())
