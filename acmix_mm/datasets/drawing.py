"""Drawing primitives shared by the synthetic demo datasets (:mod:`acmix_mm.datasets.synthetic`).

One code path draws every shape, texture and background of both layouts (COCO-format detection and
ADE20K-layout segmentation), so the two demos see the same kind of images.

Conventions:

* Images are ``float32`` arrays of shape ``(H, W, 3)``, RGB, values in [0, 255] (converted to
  ``uint8`` only when written).
* Shapes are polygons: ``float64`` arrays of shape ``(N, 2)`` of ``(x, y)`` vertices in pixels,
  in COCO's continuous coordinates (pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)``).
  A circle is a 48-gon, so a shape's mask and its COCO polygon are one and the same thing.
* Masks are rasterised by pycocotools (:func:`rasterize`), i.e. with exactly the rule COCO
  evaluation uses when it turns a polygon annotation into a mask.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    'SHAPE_KINDS', 'BACKGROUND_KINDS', 'TEXTURE_KINDS', 'shape_polygon', 'rasterize', 'background',
    'texture', 'contrasting_colour', 'mask_to_polygons', 'paint'
]

#: Shape kinds :func:`shape_polygon` draws.
SHAPE_KINDS = ('circle', 'triangle', 'rectangle', 'star', 'hexagon')
#: Background kinds :func:`background` draws.
BACKGROUND_KINDS = ('solid', 'gradient', 'noise', 'stripes')
#: Fill textures :func:`texture` draws (a shape's fill; 'solid' is one flat colour).
TEXTURE_KINDS = ('solid', 'gradient', 'noise', 'stripes')

_CIRCLE_VERTICES = 48


def shape_polygon(kind: str, centre: Sequence[float], radius: float, angle: float = 0.0,
                  aspect: float = 1.0) -> np.ndarray:
    """The polygon of one shape.

    Args:
        kind: one of :data:`SHAPE_KINDS`.
        centre: ``(x, y)`` in pixels.
        radius: circumradius in pixels (for a rectangle: half its longer side... times ``aspect``
            on one axis, see below).
        angle: rotation in radians, counter-clockwise in image coordinates.
        aspect: rectangle only: ratio of its two half-sides (the other is ``radius``).

    Returns:
        ``(N, 2)`` float64 vertices ``(x, y)``.
    """
    if radius <= 0:
        raise ValueError(f'radius must be > 0 pixels, got {radius}')
    if kind == 'circle':
        t = np.linspace(0.0, 2 * np.pi, _CIRCLE_VERTICES, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
    elif kind in ('triangle', 'hexagon'):
        n = 3 if kind == 'triangle' else 6
        t = np.arange(n) * 2 * np.pi / n - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
    elif kind == 'rectangle':
        if aspect <= 0:
            raise ValueError(f'aspect must be > 0, got {aspect}')
        # Half-sides r*cos(phi), r*sin(phi) with tan(phi) = aspect: the circumradius stays radius.
        phi = np.arctan(aspect)
        hx, hy = radius * np.cos(phi), radius * np.sin(phi)
        pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    elif kind == 'star':
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
    else:
        raise ValueError(f'unknown shape kind {kind!r}; allowed: {SHAPE_KINDS}')
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.asarray(centre, dtype=np.float64)


def rasterize(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """The union mask of polygons, rasterised by pycocotools (COCO's own rule).

    Args:
        polygons: ``(N_i, 2)`` vertex arrays, ``N_i >= 3``.
        height, width: mask size in pixels.

    Returns:
        ``(height, width)`` bool mask.
    """
    flat = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in polygons]
    if not flat:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects(flat, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray] | None:
    """The outer boundaries of a mask's connected parts as polygons.

    The contour is traced on the mask upsampled 2x, so its vertices lie a quarter pixel inside the
    boundary pixels' outer corners; rasterising the result with :func:`rasterize` gives back the
    mask exactly (tests/datasets check this round trip).

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        A list of ``(N, 2)`` polygons, one per connected part, or ``None`` when the mask has a hole
        (COCO polygons cannot express one; the caller then rejects the layout).
    """
    # At 2x, pixel i becomes the block [2i, 2i + 1] and cv2 traces the centres of boundary
    # pixels: a contour on the 1x mask would cut every boundary pixel in half.
    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), dtype=np.uint8))
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None and (hierarchy[0][:, 3] != -1).any():
        return None
    polys = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            continue
        pts = (pts + 0.5) / 2.0  # back to 1x, on the 2x pixels' centres
        polys.append(pts)
    return polys


def _unit_field(height: int, width: int, angle: float) -> np.ndarray:
    """``(H, W)`` coordinate along direction ``angle``, scaled to [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    return (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)


def _smooth_noise(height: int, width: int, rng: np.random.Generator, cell: int) -> np.ndarray:
    """``(H, W)`` smooth noise in [0, 1]: random values on a coarse grid, bicubically upsampled."""
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    coarse = rng.random((gh, gw), dtype=np.float32)
    fine = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(fine, 0.0, 1.0)


def texture(kind: str, height: int, width: int, rng: np.random.Generator,
            colour_a: np.ndarray, colour_b: np.ndarray) -> np.ndarray:
    """A ``(H, W, 3)`` float32 texture mixing two RGB colours.

    Args:
        kind: one of :data:`TEXTURE_KINDS`: 'solid' (``colour_a``), 'gradient' (a linear ramp from
            ``a`` to ``b`` in a random direction), 'noise' (smooth noise between them),
            'stripes' (bands of ``a`` and ``b``, random angle and period 4-16 px).
        colour_a, colour_b: ``(3,)`` RGB in [0, 255].
    """
    a = np.asarray(colour_a, dtype=np.float32)
    b = np.asarray(colour_b, dtype=np.float32)
    if kind == 'solid':
        t = np.zeros((height, width), dtype=np.float32)
    elif kind == 'gradient':
        t = _unit_field(height, width, rng.uniform(0, 2 * np.pi))
    elif kind == 'noise':
        t = _smooth_noise(height, width, rng, cell=int(rng.integers(4, 17)))
    elif kind == 'stripes':
        period = float(rng.uniform(4, 16))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ang = rng.uniform(0, np.pi)
        proj = xx * np.cos(ang) + yy * np.sin(ang)
        t = ((proj / period) % 1.0 < 0.5).astype(np.float32)
    else:
        raise ValueError(f'unknown texture kind {kind!r}; allowed: {TEXTURE_KINDS}')
    return a + t[..., None] * (b - a)


def background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``(H, W, 3)`` float32 background of one of :data:`BACKGROUND_KINDS`.

    Backgrounds use muted colour pairs (each channel in [30, 225]) so that shapes can contrast.
    """
    if kind not in BACKGROUND_KINDS:
        raise ValueError(f'unknown background kind {kind!r}; allowed: {BACKGROUND_KINDS}')
    a = rng.uniform(30, 225, size=3)
    # A second colour near the first keeps a background a background, not a competing object.
    b = np.clip(a + rng.uniform(-70, 70, size=3), 0, 255)
    return texture(kind, height, width, rng, a, b)


def contrasting_colour(rng: np.random.Generator, against: np.ndarray,
                       min_distance: float = 90.0, tries: int = 50) -> np.ndarray:
    """A random RGB colour at least ``min_distance`` (Euclidean, 0-255 units) from ``against``.

    After ``tries`` misses it returns the farthest candidate seen, so it always terminates.
    """
    against = np.asarray(against, dtype=np.float64)
    best, best_d = None, -1.0
    for _ in range(tries):
        c = rng.uniform(0, 255, size=3)
        d = float(np.linalg.norm(c - against))
        if d >= min_distance:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def paint(image: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> None:
    """Copy ``fill`` into ``image`` where ``mask`` is set (in place); shapes ``(H, W, 3)``/``(H, W)``."""
    image[mask] = fill[mask]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round a float image to ``uint8`` (values clipped to [0, 255])."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
