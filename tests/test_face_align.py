"""The JAX face crop equals the eval bridge's ArcFace crop on real photos, and is differentiable."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_DATA

from eval.identity import faces as bridge
from mema_jax.models.face_align import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    crop_boxes,
    similarity_transform,
    warp_affine,
)

LANDMARKS = SHARED_DATA / "faces_landmarks"


def annotated_faces():
    """(file, five points) of every 68-point face annotation of faces_landmarks, the five points
    derived as eval.identity.faces derives them from dlib's 68 (eye centres, nose tip, mouth corners)."""
    out = []
    for xml in ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"):
        for image in ET.parse(LANDMARKS / xml).getroot().iter("image"):
            for box in image.iter("box"):
                p = np.array([(float(q.get("x")), float(q.get("y"))) for q in box.iter("part")])
                if len(p) == 68:
                    out.append((image.get("file"), np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])))
    return out


def test_the_template_is_the_eval_bridges():
    np.testing.assert_array_equal(ARCFACE_TEMPLATE_112, bridge.ARCFACE_TEMPLATE_112.astype(np.float32))


def test_similarity_transform_is_the_eval_bridges_least_squares_fit():
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 400, (6, 5, 2))
    ours = np.asarray(similarity_transform(source, ARCFACE_TEMPLATE_112))
    for s, m in zip(source, ours):
        reference = bridge.similarity_transform(s, bridge.ARCFACE_TEMPLATE_112)
        # float32 arithmetic on coordinates of a few hundred pixels: 1e-3 px in the translation.
        np.testing.assert_allclose(m, reference, rtol=0, atol=1e-3)


def test_aligned_real_photos_equal_the_eval_bridges_crops_up_to_its_uint8_truncation():
    faces = annotated_faces()
    assert len(faces) == 43
    for file, points in faces:
        image = bridge.load_rgb(LANDMARKS / file)
        reference = bridge.align_to_template(image, bridge.Face((0, 0, 1, 1), points, bridge.EYES_NOSE_MOUTH5),
                                             bridge.ARCFACE_TEMPLATE_112, (112, 112)).astype(np.float64)
        ours = np.asarray(jax.jit(align_faces)(image[None], points[None].astype(np.float32)))[0].astype(np.float64)
        # PIL's bilinear warp truncates to uint8 (measured: floor(ours) == PIL for 99.9-100% of
        # values), and our float32 sample positions differ from its float64 ones by < 1e-3 px, so
        # ours - PIL lies in [0, 1) up to those 1e-3 px (measured range -0.001 .. 1.002).
        difference = ours - reference
        assert difference.min() >= -0.01 and difference.max() <= 1.01, file
        assert np.mean(np.floor(ours) == reference) >= 0.995, file


def test_warp_border_follows_pil_fill_outside_and_edge_pixels_at_the_rim():
    image = np.arange(2 * 4 * 5 * 1, dtype=np.float32).reshape(2, 4, 5, 1)
    # A shift by 0.25 px right: output x samples input x - 0.25.
    shifted = np.asarray(warp_affine(image, np.tile(np.array([[1.0, 0, 0.25], [0, 1.0, 0]]), (2, 1, 1)), (6, 4), fill=-7))
    np.testing.assert_allclose(shifted[:, :, 0], image[:, :, 0])  # -0.25 is inside [-0.5, ...): edge repeated
    np.testing.assert_allclose(shifted[:, :, 1:5], 0.75 * image[:, :, 1:5] + 0.25 * image[:, :, :4])
    np.testing.assert_allclose(shifted[:, :, 5], -7)  # 4.75 >= 5 - 0.5: outside, fill
    moved = np.asarray(warp_affine(image, np.tile(np.array([[1.0, 0, 2.0], [0, 1.0, 1.0]]), (2, 1, 1)), (5, 4)))
    np.testing.assert_array_equal(moved[:, 1:, 2:], image[:, :-1, :-2])  # integer shifts move pixels exactly
    np.testing.assert_array_equal(moved[:, :1], 0)


def test_crop_boxes_stretches_the_box_onto_the_output():
    image = np.random.default_rng(1).uniform(0, 255, (1, 40, 60, 3)).astype(np.float32)
    crop = np.asarray(crop_boxes(image, np.array([[10.0, 5.0, 30.0, 25.0]]), size=(20, 20)))
    np.testing.assert_allclose(crop[0], image[0, 5:25, 10:30], atol=1e-4)  # a 1:1 box is a plain cut


def test_gradients_flow_to_the_image_and_the_points():
    image = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)), jnp.float32)
    points = jnp.asarray([[[22.0, 28.0], [40.0, 28.0], [31.0, 37.0], [24.0, 45.0], [38.0, 45.0]]] * 2)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(2, 112, 112, 3)), jnp.float32)

    def loss(img, pts):
        return jnp.sum(align_faces(img, pts) * weights)

    g_image, g_points = jax.grad(loss, argnums=(0, 1))(image, points)
    # The crop is linear in the image: its gradient is the transpose of the warp, and the
    # directional derivative along any image direction is the crop of that direction.
    direction = jnp.asarray(np.random.default_rng(4).normal(size=image.shape), jnp.float32)
    assert float(jnp.vdot(g_image, direction)) == pytest.approx(float(jnp.sum(align_faces(direction, points) * weights)),
                                                                rel=1e-4)
    assert float(jnp.abs(g_image).sum()) > 0 and bool(jnp.isfinite(g_points).all()) and float(jnp.abs(g_points).sum()) > 0
    # Through the points: matches a central finite difference (the bilinear weights are smooth
    # between pixel crossings; a 1e-2 px step crosses few of them).
    step = jnp.zeros_like(points).at[0, 2, 0].set(1e-2)
    numeric = (loss(image, points + step) - loss(image, points - step)) / 2e-2
    assert float(g_points[0, 2, 0]) == pytest.approx(float(numeric), rel=0.05)
