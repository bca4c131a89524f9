"""Procedural paired chest-radiograph phantoms: CXR, soft-tissue target and bone image.

A phantom is built the way a radiograph forms. Each structure adds its line integral of attenuation
(projected path length x attenuation, in arbitrary but consistent units) to a soft-tissue or a bone
map; the detector sees exp(-(soft + bone)), blurred, with quantum noise; the display is the negative
log of that through a tone curve, as in the SZCH-X-Rays samples (bones bright, lungs dark). The
soft-tissue target is the same exposure with the bone map left out (what dual-energy subtraction
gives), so CXR, target and bone image share one noise field and differ only by the bones.

Coordinates are normalised: x, y in [-1, 1], x to the right of the image (the patient's left), y
downwards. Every anatomical parameter is drawn from the seed before anything is rendered, so a seed
gives the same anatomy at every resolution; only the quantum noise is drawn per resolution.

    python -m bsldm_fast.data.phantom --out DIR --count N --size S [--seed K] [--bits 8|16]

writes the training layout DIR/CXR/NAME.png + DIR/BS/NAME.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_SIZE = 1024
TEXTURE_GRID = 64
"""Lung-texture noise is drawn on this fixed grid and upsampled, so it does not depend on the size."""
LUNG_MAP_GRID = 256
"""The vessel trees look up where the lungs are on this fixed grid, for the same reason."""


@dataclass(frozen=True)
class Phantom:
    """One paired phantom; images are float32 [S, S] display values in [0, 1] (1 = bright)."""

    cxr: np.ndarray
    """The conventional radiograph: soft tissue + bone."""
    soft: np.ndarray
    """The bone-suppressed (soft-tissue) target."""
    bone: np.ndarray
    """cxr - soft: the bones as the display shows them (what BSR calls the bone image)."""
    seed: int


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _chord(d: np.ndarray, r: float) -> np.ndarray:
    """Path length through a cylinder of radius r at distance d from its axis."""
    return 2.0 * np.sqrt(np.maximum(r * r - d * d, 0.0))


class _Canvas:
    """A line-integral map on the normalised grid, drawn into through bounding boxes."""

    def __init__(self, size: int):
        self.size = size
        self.pixel = 2.0 / size
        self.coords = ((np.arange(size, dtype=np.float32) + 0.5) * self.pixel - 1.0).astype(np.float32)
        self.values = np.zeros((size, size), np.float32)

    def box(self, x0: float, x1: float, y0: float, y1: float):
        """Slices of the pixels whose centres lie in [x0, x1] x [y0, y1], and their coordinates."""
        s = self.size
        i0 = max(0, int(math.floor((y0 + 1.0) / self.pixel - 0.5)))
        i1 = min(s, int(math.ceil((y1 + 1.0) / self.pixel + 0.5)))
        j0 = max(0, int(math.floor((x0 + 1.0) / self.pixel - 0.5)))
        j1 = min(s, int(math.ceil((x1 + 1.0) / self.pixel + 0.5)))
        if i1 <= i0 or j1 <= j0:
            return None
        x = self.coords[j0:j1][None, :]
        y = self.coords[i0:i1][:, None]
        return (slice(i0, i1), slice(j0, j1)), x, y

    def add(self, region, values: np.ndarray) -> None:
        self.values[region] += values

    def thin(self, radius: float, mu: float) -> tuple[float, float]:
        """A radius of at least ~0.7 pixel with the attenuation scaled to keep the projected area,
        so structures thinner than a pixel neither vanish nor alias at low resolution."""
        least = 0.7 * self.pixel
        if radius >= least:
            return radius, mu
        return least, mu * (radius / least) ** 2


def _tube_profile(d: np.ndarray, radius: float, cortex: float, mu_cortex: float,
                  mu_marrow: float) -> np.ndarray:
    """Line integral across a hollow bone: a cortical shell around marrow. The shell is seen
    edge-on at the borders, which is why bones in a radiograph have bright edges."""
    inner = max(radius - cortex, 0.0)
    outer = _chord(d, radius)
    core = _chord(d, inner)
    return mu_cortex * (outer - core) + mu_marrow * core


# ----------------------------------------------------------------------------- anatomy parameters

@dataclass(frozen=True)
class _Body:
    scale: float       # patient size
    shift: float       # horizontal offset of the midline
    tilt: float        # small rotation (radians)
    width: float       # torso half-width
    depth: float       # line integral through the torso centre
    neck: float        # neck half-width
    shoulder_y: float  # height of the shoulders
    dome_r: float      # top of the right (image-left) diaphragm dome
    dome_l: float      # top of the left dome
    lung_w: float      # lung half-width
    apex: float        # height of the lung apices
    heart_w: float     # heart half-width
    heart_x: float     # heart centre
    breasts: float     # 0 (none) .. 1
    bubble: float      # gastric air bubble strength
    spine_curve: float  # scoliosis amplitude
    exposure: float    # detector counts per 1024^2 pixel in air
    tone: float        # tone-curve constant


def _draw_body(rng: np.random.Generator) -> _Body:
    scale = rng.uniform(0.92, 1.06)
    dome_r = rng.uniform(0.30, 0.48)
    return _Body(
        scale=scale,
        shift=rng.normal(0, 0.015),
        tilt=rng.normal(0, 0.02),
        width=0.9 * scale + rng.normal(0, 0.02),
        depth=rng.uniform(2.1, 2.45),
        neck=rng.uniform(0.17, 0.22),
        shoulder_y=rng.uniform(-0.9, -0.8),
        dome_r=dome_r,
        dome_l=dome_r + rng.uniform(0.02, 0.08),  # the left dome sits a little lower
        lung_w=0.34 * scale + rng.normal(0, 0.015),
        apex=rng.uniform(-0.72, -0.62),
        heart_w=rng.uniform(0.29, 0.35),
        heart_x=rng.uniform(0.07, 0.13),
        breasts=float(rng.uniform(0.3, 1.0)) if rng.random() < 0.4 else 0.0,
        bubble=float(rng.uniform(0.2, 0.6)) if rng.random() < 0.6 else 0.0,
        spine_curve=rng.normal(0, 0.012),
        exposure=rng.uniform(5e3, 1.5e4),
        tone=rng.uniform(1.3, 1.45),
    )


# ----------------------------------------------------------------------------- soft tissue


def _dome(body: _Body, x: np.ndarray, side: int) -> np.ndarray:
    """Height of the diaphragm under the lung on `side` (-1: image left, +1: image right)."""
    top = body.dome_r if side < 0 else body.dome_l
    centre = side * 0.42 * body.scale + body.shift
    return top + 0.55 * ((x - centre) / (0.55 * body.scale)) ** 2


def _lung_air(body: _Body, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Share (0..1) of the path through the body that runs through one lung, before the heart."""
    w = body.lung_w
    cx = side * (0.10 + w) * body.scale + body.shift
    cy = 0.0
    half_h = cy - body.apex
    u = (x - cx) / w
    v = (y - cy) / half_h
    # A lung is narrow at the apex and widest at the base: widen u's scale downwards.
    u = u / (0.78 + 0.22 * np.clip(v + 1.0, 0.0, 2.0))
    rho2 = np.abs(u) ** 2.4 + np.where(v < 0, np.abs(v) ** 2.0, 0.0)
    inside = np.clip(1.0 - rho2, 0.0, 1.0) ** 0.45
    below = _smoothstep((_dome(body, x, side) - y) / 0.04)
    # Medial border: the mediastinum, with the aortic knob on the patient's left (image right).
    medial = 0.095 + (0.06 * np.exp(-(((y + 0.33) / 0.07) ** 2)) if side > 0 else 0.0)
    mediastinum = _smoothstep((side * (x - body.shift) - medial) / 0.05)
    return inside * below * mediastinum


def _heart(body: _Body, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Projected thickness profile of the heart (0..1), an ellipse resting on the left dome."""
    cx = body.heart_x + body.shift
    cy = 0.5 * (body.dome_r + body.dome_l) - 0.1
    u = (x - cx) / body.heart_w
    v = (y - cy) / 0.25
    # Rotate slightly: the apex points down and to the patient's left.
    a = 0.45
    ur, vr = u * math.cos(a) + v * math.sin(a), -u * math.sin(a) + v * math.cos(a)
    return np.clip(1.0 - ur * ur - vr * vr, 0.0, 1.0) ** 0.5


def _render_soft(canvas: _Canvas, body: _Body, rng: np.random.Generator,
                 nodules: bool = True) -> np.ndarray:
    """Soft-tissue line integral: body, lungs, heart, mediastinum, diaphragm, vessels, nodules."""
    x = canvas.coords[None, :]
    y = canvas.coords[:, None]
    xs = x - body.shift
    # Body outline: neck, shoulders, torso (an elliptic cylinder in projection).
    t = _smoothstep((y - body.shoulder_y + 0.1) / 0.3)
    half_w = body.neck + (body.width + 0.1 - body.neck) * t - 0.1 * _smoothstep((y - body.shoulder_y - 0.2) / 0.5)
    rel = np.clip(1.0 - (xs / half_w) ** 2, 0.0, 1.0)
    # The neck and shoulders are thinner front to back than the chest.
    thickness = body.depth * rel ** 0.4 * (0.7 + 0.3 * _smoothstep((y - body.shoulder_y + 0.05) / 0.35))
    # Real tissue is not uniform: a gentle random variation, thicker towards the abdomen.
    lumps = _resize(rng.standard_normal((6, 6)).astype(np.float32), canvas.size)
    thickness = thickness * (1.0 + 0.04 * lumps + 0.08 * y)
    # Arms beside the torso, from the shoulders down.
    for side in (-1, 1):
        d = xs - side * (body.width + 0.13)
        arm = _chord(d, 0.11) / 0.22 * _smoothstep((y - body.shoulder_y) / 0.15)
        thickness = thickness + 1.6 * arm
    thickness = thickness + body.breasts * 0.45 * np.sum(
        [np.clip(1 - ((xs - s * 0.45) / 0.3) ** 2 - ((y - 0.55) / 0.22) ** 2, 0, 1) ** 0.5
         for s in (-1, 1)], axis=0)

    air = _lung_air(body, x, y, -1) + _lung_air(body, x, y, 1)
    heart = _heart(body, x, y)
    # The heart lies in front of part of the lungs: it displaces most, not all, of their air.
    air = air * (1.0 - 0.8 * heart)
    lungs = air
    # Parenchymal texture: low-contrast, band-limited, inside the lungs only.
    texture = rng.standard_normal((TEXTURE_GRID, TEXTURE_GRID)).astype(np.float32)
    texture = _resize(texture, canvas.size)
    air = 0.74 * thickness * air * (1.0 + 0.04 * texture)
    # Trachea and main bronchi: air columns down the neck into the mediastinum.
    carina = -0.28 + rng.normal(0, 0.02)
    trachea = _chord(xs, 0.035) / 0.07 * _smoothstep((carina - y) / 0.05)
    air = air + 0.3 * trachea
    # Gastric bubble under the left dome.
    if body.bubble > 0:
        bx, by = 0.38 * body.scale + body.shift, body.dome_l + 0.13
        air = air + body.bubble * np.clip(1 - ((x - bx) / 0.13) ** 2 - ((y - by) / 0.08) ** 2, 0, 1) ** 0.5
    # A little scatter keeps the background off black.
    canvas.values += thickness - air + 0.12

    # Vessel trees from each hilum, clipped to the lungs.
    vessels = _Canvas(canvas.size)
    # Where the lungs are, on a fixed grid (the same at every resolution): branches stop outside.
    grid = _Canvas(LUNG_MAP_GRID).coords
    lung_map = _lung_air(body, grid[None, :], grid[:, None], -1) + _lung_air(body, grid[None, :], grid[:, None], 1)
    for side in (-1, 1):
        hilum = (side * (0.17 if side < 0 else 0.2) + body.shift, -0.08 + rng.normal(0, 0.02))
        for angle in (-0.5 * math.pi - side * 0.2, -0.5 * math.pi - side * 0.7,
                      math.pi * (0.5 - 0.5 * side) + side * 0.15, 0.5 * math.pi + side * 0.9,
                      0.5 * math.pi + side * 0.45, 0.5 * math.pi - side * 0.05):
            angle = angle + rng.normal(0, 0.12)
            _vessel(vessels, lung_map, rng, hilum, angle, 0.11, 0.01, 0)
    canvas.values += vessels.values * np.minimum(lungs * 1.6, 1.0)

    # Nodules: spheres of tissue inside the lungs, of varied size and contrast.
    for _ in range(rng.poisson(0.8)):
        side = -1 if rng.random() < 0.5 else 1
        nx = side * (0.12 + rng.uniform(0.1, 0.9) * body.lung_w * 1.6) + body.shift
        ny = rng.uniform(body.apex + 0.15, body.dome_r - 0.05)
        radius = rng.uniform(0.008, 0.05)
        mu = rng.uniform(4.0, 12.0) * (0.6 + 0.4 * (0.02 / max(radius, 0.02)))
        radius, mu = canvas.thin(radius, mu)
        found = canvas.box(nx - radius, nx + radius, ny - radius, ny + radius)
        if nodules and found is not None:
            region, bx, by = found
            d = np.sqrt((bx - nx) ** 2 + (by - ny) ** 2)
            canvas.add(region, mu * _chord(d, radius) * 0.5)
    return lungs


def _vessel(canvas: _Canvas, lung_map: np.ndarray, rng: np.random.Generator, start: tuple[float, float],
            angle: float, length: float, radius: float, depth: int) -> None:
    """A pulmonary vessel segment as a blood-filled tube, then its two daughter branches."""
    end = (start[0] + length * math.cos(angle), start[1] + length * math.sin(angle))
    n = lung_map.shape[0]
    i = min(max(int((end[1] + 1.0) / 2.0 * n), 0), n - 1)
    j = min(max(int((end[0] + 1.0) / 2.0 * n), 0), n - 1)
    if lung_map[i, j] < 0.03 and depth > 1:
        return
    r, mu = canvas.thin(radius, 16.0)
    found = canvas.box(min(start[0], end[0]) - r, max(start[0], end[0]) + r,
                       min(start[1], end[1]) - r, max(start[1], end[1]) + r)
    if found is not None:
        region, x, y = found
        dx, dy = end[0] - start[0], end[1] - start[1]
        t = np.clip(((x - start[0]) * dx + (y - start[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        d = np.sqrt((x - start[0] - t * dx) ** 2 + (y - start[1] - t * dy) ** 2)
        canvas.add(region, mu * _chord(d, r))
    if depth >= 7 or radius < 0.001:
        return
    spread = rng.uniform(0.35, 0.65)
    bias = rng.normal(0, 0.1)
    for turn in (-spread / 2 + bias, spread / 2 + bias):
        _vessel(canvas, lung_map, rng, end, angle + turn, length * rng.uniform(0.68, 0.85),
                radius * rng.uniform(0.68, 0.8), depth + 1)


# ----------------------------------------------------------------------------- bones


def _arc(canvas: _Canvas, side: int, cx: float, cy: float, a: float, b: float, th0: float,
         th1: float, radius: float, cortex: float, mu_c: float, mu_m: float, shift: float) -> None:
    """A bone band along an elliptic arc (a rib); angles measured with x mirrored for side +1, so
    both sides share one description; the band tapers at both ends."""
    x_abs = side * cx + shift
    found = canvas.box(x_abs - a - 2 * radius, x_abs + a + 2 * radius, cy - b - 2 * radius,
                       cy + b + 2 * radius)
    if found is None:
        return
    region, x, y = found
    dx = -side * (x - x_abs) / a  # medial is +dx on both sides
    dy = (y - cy) / b
    rho = np.sqrt(dx * dx + dy * dy) + 1e-6
    grad = np.sqrt((dx / a) ** 2 + (dy / b) ** 2) / rho
    d = (rho - 1.0) / np.maximum(grad, 1e-6)
    theta = np.arctan2(dy, dx)
    mid, half = 0.5 * (th0 + th1), 0.5 * (th1 - th0)
    phi = np.abs((theta - mid + math.pi) % (2 * math.pi) - math.pi)
    taper = _smoothstep((half - phi) / 0.12)
    canvas.add(region, _tube_profile(d, radius, cortex, mu_c, mu_m) * taper)


def _render_bone(canvas: _Canvas, body: _Body, rng: np.random.Generator) -> None:
    """Bone line integral: posterior and anterior ribs, clavicles, spine, scapulae, humeral heads."""
    sc = body.scale
    px = canvas.pixel
    cortex = max(0.006, 0.7 * px)
    # Posterior ribs: from the spine, up and out over the lung, down along the lateral wall.
    n_post = 10
    top = body.apex + 0.06 + rng.normal(0, 0.015)
    spacing = (body.dome_r + 0.25 - top) / n_post * rng.uniform(0.95, 1.05)
    for side in (-1, 1):
        for k in range(n_post):
            y_med = top + k * spacing + rng.normal(0, 0.008)
            lateral = (0.30 + 0.55 * min(k, 4) / 4) * sc * rng.uniform(0.95, 1.03)
            th_m = rng.uniform(-0.35, -0.1)
            th_l = -math.pi - rng.uniform(0.4, 0.8)
            a = (lateral - 0.05) / (1.0 + math.cos(th_m))
            b = (0.07 + 0.02 * min(k, 5)) * rng.uniform(0.9, 1.1)
            cx = 0.05 + a * math.cos(th_m)  # distance of the centre from the midline
            cy = y_med - b * math.sin(th_m)
            radius = (0.016 + 0.001 * min(k, 6)) * sc
            _arc(canvas, side, cx, cy, a, b, th_l, th_m, radius, cortex, 10.0, 1.8, body.shift)
    # Anterior ribs: from the lateral wall down and in towards the sternum, thinner and fainter.
    for side in (-1, 1):
        for k in range(6):
            y_lat = top + 0.12 + k * spacing * 1.15 + rng.normal(0, 0.01)
            lateral = (0.55 + 0.25 * min(k, 3) / 3) * sc
            medial = 0.20 + rng.uniform(0, 0.06)
            th_l, th_m = math.pi - rng.uniform(0.05, 0.2), 0.5 * math.pi + rng.uniform(0.1, 0.4)
            # Solve the centre and radii so the arc runs from (lateral, y_lat) to (medial, lower).
            a = (lateral - medial) / (math.cos(th_m) - math.cos(th_l))
            b = 0.26 * rng.uniform(0.85, 1.15)
            cx = medial + a * math.cos(th_m)
            cy = y_lat - b * math.sin(th_l)
            _arc(canvas, side, cx, cy, a, b, th_m, th_l, 0.016 * sc, cortex, 5.0, 1.4, body.shift)
    # Clavicles: S-shaped tubes from the sternal notch out to the shoulders.
    for side in (-1, 1):
        x0, x1 = 0.07, 0.72 * sc
        y0 = body.apex + rng.uniform(0.0, 0.05)
        y1 = y0 - rng.uniform(0.02, 0.1)
        wiggle = rng.uniform(0.015, 0.035)
        found = canvas.box(side * x1 + body.shift if side < 0 else x0 + body.shift,
                           -x0 + body.shift if side < 0 else side * x1 + body.shift,
                           min(y0, y1) - 0.08, max(y0, y1) + 0.08)
        if found is not None:
            region, x, y = found
            t = (side * (x - body.shift) - x0) / (x1 - x0)
            f = y0 + (y1 - y0) * t + wiggle * np.sin(2 * math.pi * t)
            slope = ((y1 - y0) + wiggle * 2 * math.pi * np.cos(2 * math.pi * t)) * side / (x1 - x0)
            d = (y - f) / np.sqrt(1.0 + slope * slope)
            taper = _smoothstep(t / 0.05) * _smoothstep((1.0 - t) / 0.05)
            canvas.add(region, _tube_profile(d, 0.026 * sc, cortex, 10.0, 3.0) * taper)
    # Scapulae: a thin plate lateral to a bright, slightly curved medial border.
    for side in (-1, 1):
        y0, y1 = body.shoulder_y + 0.05, body.shoulder_y + rng.uniform(0.5, 0.6)
        found = canvas.box(-1.0, 1.0, y0 - 0.02, y1 + 0.02)
        if found is not None:
            region, x, y = found
            t = (y - y0) / (y1 - y0)
            border = (0.58 * sc + 0.07 * t - 0.06 * t * t) + rng.normal(0, 0.005)
            dist = side * (x - body.shift) - border
            span = _smoothstep(t / 0.1) * _smoothstep((1.0 - t) / 0.15)
            plate = 0.25 * _smoothstep(dist / 0.02) * _smoothstep((0.3 * (1.0 - t) - dist) / 0.04)
            edge = _tube_profile(dist, 0.01, cortex, 9.0, 2.5)
            canvas.add(region, (plate + edge) * span)
    # Humeral heads in the upper corners.
    for side in (-1, 1):
        hx, hy, hr = side * (body.width + 0.08) + body.shift, body.shoulder_y + 0.1, 0.11 * sc
        found = canvas.box(hx - hr, hx + hr, hy - hr, hy + hr)
        if found is not None:
            region, x, y = found
            d = np.sqrt((x - hx) ** 2 + (y - hy) ** 2)
            canvas.add(region, _tube_profile(d, hr, cortex, 3.0, 1.2))
    # Spine: vertebral bodies with cortical rims and endplates, pedicles, disc spaces between.
    y = -1.05
    while y < 1.05:
        h = (0.045 + 0.035 * _smoothstep(np.float32((y + 1.0) / 1.6))) * sc
        w = 0.75 * h + 0.02
        cx = body.shift + body.spine_curve * math.sin(2.5 * y + 1.0)
        cy = y + h / 2
        found = canvas.box(cx - 1.6 * w, cx + 1.6 * w, y - 0.01, y + h + 0.01)
        if found is not None:
            region, bx, by = found
            # A rounded box: vertebral bodies have bevelled corners.
            vertical = np.clip(1.0 - np.abs(2.0 * (by - cy) / h) ** 6, 0.0, 1.0) ** 0.5
            body_profile = _tube_profile(bx - cx, w, cortex, 3.5, 1.0) * vertical
            endplate = (np.exp(-(((by - y - 0.004) / 0.004) ** 2)) + np.exp(-(((y + h - by - 0.004) / 0.004) ** 2)))
            endplate = endplate * _chord(bx - cx, w) * 0.7
            pedicles = sum(
                _tube_profile(np.sqrt(((bx - cx - s * 0.62 * w) / 0.22) ** 2 + ((by - cy + 0.15 * h) / 0.3) ** 2) * w * 0.25,
                              w * 0.25, cortex, 3.0, 0.5)
                for s in (-1, 1))
            canvas.add(region, body_profile + endplate + pedicles)
        y += h * 1.28


def _resize(field: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect padding), sigma in pixels."""
    if sigma < 0.3:
        return field
    radius = max(1, int(math.ceil(3.0 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    t = torch.from_numpy(field)[None, None]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return t[0, 0].numpy()


def _display(line_integral: np.ndarray, tone: float) -> np.ndarray:
    """Negative-log display through a compressive tone curve, like a processed radiograph."""
    # The gamma darkens the mid-tones (lungs, chest wall) to the SZCH samples' histogram.
    d = np.clip((1.0 - np.exp(-line_integral / tone)) / (1.0 - math.exp(-3.6 / tone)), 0.0, 1.0)
    return d ** 1.3


def generate(seed: int, size: int = 256, nodules: bool = True, noise: bool = True) -> Phantom:
    """One paired phantom (CXR, soft-tissue target, bone image) for `seed` at `size` x `size`;
    `noise=False` leaves out the quantum noise (clean references, tests)."""
    if not 16 <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [16, {MAX_SIZE}], got {size}")
    rng = np.random.default_rng([int(seed), 0])
    body = _draw_body(rng)
    soft = _Canvas(size)
    _render_soft(soft, body, np.random.default_rng([int(seed), 1]), nodules)
    bone = _Canvas(size)
    _render_bone(bone, body, np.random.default_rng([int(seed), 2]))

    sigma = 0.9 * size / 1024
    soft_l = _blur(soft.values, sigma)
    bone_l = _blur(bone.values, sigma)
    total = soft_l + bone_l
    # Quantum noise: Poisson counts exp(-L) * N per pixel, Gaussian in the log domain with
    # std 1/sqrt(counts). Larger pixels collect more counts. One noise field for both images:
    # the soft-tissue target comes from the same exposure.
    counts = body.exposure * (MAX_SIZE / size) ** 2 * np.exp(-total)
    quantum = np.zeros((size, size), np.float32)
    if noise:
        noise_rng = np.random.default_rng([int(seed), 3, size])
        quantum = noise_rng.standard_normal((size, size), dtype=np.float32) / np.sqrt(np.maximum(counts, 1.0))
    cxr = _display(total + quantum, body.tone).astype(np.float32)
    target = _display(soft_l + quantum, body.tone).astype(np.float32)
    cxr = np.clip(cxr, 0.0, 1.0)
    target = np.clip(target, 0.0, 1.0)
    return Phantom(cxr=cxr, soft=target, bone=cxr - target, seed=int(seed))


def to_integer(image: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] floats -> uint8 or uint16 with rounding."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = 255 if bits == 8 else 65535
    return np.rint(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


def write_dataset(out_dir: str | Path, count: int, size: int = 256, seed: int = 0, bits: int = 16,
                  overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Write `count` phantoms in the training layout OUT/CXR/NAME.png + OUT/BS/NAME.png.

    Phantom i has seed `seed + i` and the name f"{seed + i:06d}.png", so disjoint seed ranges give
    disjoint sets (e.g. training from 0, held-out evaluation from 1_000_000). Existing files are
    never replaced unless `overwrite`; nothing is written if any would be.
    """
    from tqdm import tqdm

    from ..io import write_image

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    to_integer(np.zeros(1), bits)  # validate `bits` before touching the disk
    if not 16 <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [16, {MAX_SIZE}], got {size}")
    out = Path(out_dir)
    names = [f"{seed + i:06d}.png" for i in range(count)]
    if not overwrite:
        existing = [out / sub / n for n in names for sub in ("CXR", "BS") if (out / sub / n).exists()]
        if existing:
            raise FileExistsError(f"{len(existing)} output files exist already, e.g. {existing[0]}; "
                                  "pass overwrite=True (--overwrite) to replace them")
    written = []
    for i, name in enumerate(tqdm(names, desc="phantoms", unit="img", disable=not progress,
                                  file=sys.stderr)):
        p = generate(seed + i, size)
        write_image(out / "CXR" / name, to_integer(p.cxr, bits), overwrite=overwrite)
        write_image(out / "BS" / name, to_integer(p.soft, bits), overwrite=overwrite)
        written.append(out / "CXR" / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bsldm_fast.data.phantom",
        description="Write paired synthetic chest radiographs: OUT/CXR/NAME.png and OUT/BS/NAME.png "
        "(the soft-tissue target). Phantom i has seed SEED + i.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of phantoms")
    parser.add_argument("--size", type=int, default=256, help=f"image size, 16..{MAX_SIZE} (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default 0)")
    parser.add_argument("--bits", type=int, default=16, choices=(8, 16), help="PNG bit depth (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        written = write_dataset(args.out, args.count, args.size, args.seed, args.bits, args.overwrite)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} pairs to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
