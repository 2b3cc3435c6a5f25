"""Rendering one synthetic Cell Painting field (and its exact instance masks) from a phenotype.

Each field is one layout of cells rendered in the five Cell Painting stains (channel order
:data:`SYNTH_CHANNELS`): DNA (textured elliptical nuclei), ER (perinuclear reticulum fading outward),
RNA (bright nucleoli plus diffuse cytoplasm), AGP (cell outlines from a weighted-Voronoi segmentation
plus actin fibres) and Mito (puncta and short tubules in the cytoplasm).  Because every stain is drawn
from the *same* cells, a phenotype that changes cell size, nuclear size, elongation, density or
puncta density is visible in every single channel -- which is what lets a model trained on one
channel transfer to another (design targets Q1/Q2).

Scale: cell sizes are defined for a nominal 128-px field and multiplied by ``sqrt(size / 128)``.  The
square root is a compromise between two uses: a 64-px demo field keeps a countable number of cells
(control ~15; 4 enlarged ... 40 condensed) at a resolution where nuclei and puncta are still resolved,
and a 1080-px field gets JUMP-like statistics (control ~250 cells of ~36 px radius; 60 ... 660 over the
first four phenotypes).  Counts of puncta and nucleoli per cell do not depend on the size.

Noise: photons = vignetting x (background + stain signal); shot noise uses the Gaussian approximation
of the Poisson distribution (same mean and variance; counts here are >= ~60 photons, where the two are
indistinguishable, and it is 3x faster than ``rng.poisson``), plus Gaussian read noise and a camera
offset, clipped to uint16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SYNTH_CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")
NOMINAL_SIZE = 128
#: Object classes of the instance masks, in the order files are written.
MASK_OBJECTS: tuple[str, ...] = ("nuclei", "cells")


# Imaging model (photo-electrons; gain 1 ADU/e-).
_PEAK_PHOTONS = np.array([2600.0, 1300.0, 1500.0, 1400.0, 1700.0], dtype=np.float32)
_CAMERA_OFFSET = 100.0
_READ_NOISE = 4.0


@dataclass(frozen=True)
class Phenotype:
    """Morphology parameters of one class; lengths in px of a nominal 128-px field."""

    name: str
    radius: float  # equal-area cell radius
    elongation: float  # cell axis ratio (major / minor)
    nuc_ratio: float  # nucleus radius / cell radius
    nuc_elongation: float
    confluence: float  # fraction of the field covered by cells
    aligned: bool  # cells share one orientation (spindle-like streams)
    mito_density: float  # mitochondrial objects per nominal px^2 of cell area
    tubular: float  # fraction of mitochondria drawn as short tubules (rest are puncta)
    fibers: float  # mean actin fibres per cell
    chromatin: float  # chromatin texture amplitude
    nucleoli: float  # mean nucleoli per nucleus
    er_spread: float  # ER / cytoplasmic RNA decay length as a fraction of the cell radius
    dna_gain: float  # DNA brightness (condensed chromatin is brighter)
    irregularity: float  # cell boundary roughness
    mitotic: float  # fraction of rounded mitotic cells


#: Class table; class 0 is the control.  ``n_classes`` takes the first entries.
PHENOTYPES: tuple[Phenotype, ...] = (
    Phenotype("control", 12.5, 1.35, 0.42, 1.15, 0.75, False, 0.10, 0.6, 2.0, 0.22, 2.0, 0.35, 1.0,
              0.09, 0.04),
    Phenotype("enlarged", 21.0, 1.2, 0.40, 1.1, 0.52, False, 0.14, 0.8, 5.0, 0.12, 3.5, 0.65, 0.75,
              0.12, 0.01),
    Phenotype("elongated", 15.0, 3.2, 0.38, 1.9, 0.62, True, 0.09, 0.95, 3.0, 0.18, 1.5, 0.45, 0.9,
              0.05, 0.02),
    Phenotype("condensed", 8.5, 1.1, 0.55, 1.05, 0.92, False, 0.06, 0.05, 0.3, 0.45, 1.0, 0.22, 1.5,
              0.04, 0.10),
    Phenotype("macronuclear", 15.0, 1.4, 0.62, 1.3, 0.70, False, 0.10, 0.5, 1.5, 0.30, 5.0, 0.30, 0.85,
              0.06, 0.0),
    Phenotype("irregular", 14.0, 1.6, 0.45, 1.5, 0.50, False, 0.20, 0.2, 1.0, 0.35, 2.0, 0.50, 1.1,
              0.28, 0.05),
    Phenotype("rounded", 11.0, 1.0, 0.50, 1.0, 0.45, False, 0.08, 0.3, 0.0, 0.20, 2.0, 0.30, 1.2,
              0.02, 0.15),
    Phenotype("granular", 13.0, 1.3, 0.42, 1.15, 0.75, False, 0.26, 0.0, 2.0, 0.60, 3.0, 0.40, 1.0,
              0.08, 0.04),
)
MAX_CLASSES = len(PHENOTYPES)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Unit-variance random field with correlation length ``scale`` px (cheap: upsampled coarse noise)."""
    if scale <= 1.5:
        n = rng.standard_normal((size, size), dtype=np.float32)
        n = cv2.GaussianBlur(n, (0, 0), max(scale, 0.5))
    else:
        m = max(int(math.ceil(size / scale)) + 1, 2)
        n = rng.standard_normal((m, m), dtype=np.float32)
        n = cv2.resize(n, (size, size), interpolation=cv2.INTER_CUBIC)
    sd = float(n.std())
    return n / sd if sd > 0 else n


def _place_cells(rng: np.random.Generator, size: int, radius: float, confluence: float,
                 elongation: float, angle: float) -> np.ndarray:
    """Cell centres: a jittered hexagonal lattice in the cells' stretched frame, randomly thinned.

    The lattice gives the even spacing of confluent cultures, thinning gives gaps and clumps; points
    just outside the field are kept so cells are cut by the field border like in real images.
    """
    d = 1.75 * radius  # lattice spacing in the isotropic (stretched) frame; cells overlap -> Voronoi
    lattice_coverage = math.pi * radius**2 / (math.sqrt(3) / 2 * d**2)
    keep = min(1.0, confluence / min(lattice_coverage, 1.0))
    sq = math.sqrt(elongation)
    half = 0.5 * size + radius * sq  # half extent of the region to cover (incl. margin)
    reach = half * math.sqrt(2) * sq + d  # lattice extent in the stretched frame
    n1 = int(math.ceil(reach / d))
    ii, jj = np.meshgrid(np.arange(-n1, n1 + 1), np.arange(-n1, n1 + 1), indexing="ij")
    x = (ii + 0.5 * (jj % 2)).ravel() * d
    y = jj.ravel() * d * math.sqrt(3) / 2
    x = x + rng.uniform(-0.3, 0.3, x.size) * d
    y = y + rng.uniform(-0.3, 0.3, y.size) * d
    offset = rng.uniform(0, d, 2)
    x, y = x + offset[0], y + offset[1]
    # stretch along the cells' major axis, rotate, centre on the field
    u, v = x * sq, y / sq
    c, s = math.cos(angle), math.sin(angle)
    px = u * c - v * s + 0.5 * size
    py = u * s + v * c + 0.5 * size
    inside = (px > -radius * sq) & (px < size + radius * sq) & (py > -radius * sq) & (py < size + radius * sq)
    kept = inside & (rng.random(px.size) < keep)
    return np.stack([px[kept], py[kept]], axis=1)


def render_field(rng: np.random.Generator, size: int, pheno: Phenotype,
                 plate_gain: np.ndarray | None = None,
                 with_masks: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one field (5, size, size) uint16 for phenotype ``pheno`` from ``rng``.

    ``with_masks`` also returns the exact instance labels ``{"nuclei": ..., "cells": ...}`` (see
    :func:`instance_masks`); the image is the same either way (the masks draw nothing from ``rng``).
    """
    s = math.sqrt(size / NOMINAL_SIZE)
    f32 = np.float32

    # ---- field-level variation ------------------------------------------------------------------
    radius = pheno.radius * s * math.exp(rng.normal(0.0, 0.06))
    confluence = float(np.clip(pheno.confluence + rng.normal(0.0, 0.05), 0.2, 1.0))
    field_angle = rng.uniform(0, math.pi)
    centres = _place_cells(rng, size, radius, confluence, pheno.elongation if pheno.aligned else 1.0,
                           field_angle)
    n = len(centres)

    # ---- per-cell parameters --------------------------------------------------------------------
    mitotic = rng.random(n) < pheno.mitotic
    r_cell = radius * np.exp(rng.normal(0.0, 0.13, n))
    elong = np.maximum(1.0, pheno.elongation * np.exp(rng.normal(0.0, 0.15, n)))
    theta = (field_angle + rng.normal(0.0, 0.18, n)) if pheno.aligned else rng.uniform(0, math.pi, n)
    r_nuc = r_cell * pheno.nuc_ratio * np.exp(rng.normal(0.0, 0.08, n))
    nelong = np.maximum(1.0, pheno.nuc_elongation * np.exp(rng.normal(0.0, 0.1, n)))
    # mitotic cells round up, condense their chromatin and shrink
    r_cell = np.where(mitotic, radius * 0.62, r_cell)
    elong = np.where(mitotic, 1.0, elong)
    r_nuc = np.where(mitotic, radius * 0.62 * 0.6, r_nuc)
    nelong = np.where(mitotic, 1.15, nelong)
    A, B = r_cell * np.sqrt(elong), r_cell / np.sqrt(elong)
    a = r_nuc * np.sqrt(nelong)
    b = np.minimum(r_nuc / np.sqrt(nelong), 0.8 * B)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    # nucleus sits slightly off-centre along the major axis
    nuc_off = rng.uniform(-0.15, 0.15, n) * np.maximum(A - a, 0.0)
    brightness = np.exp(rng.normal(0.0, 0.22, (n, 5))).astype(f32)
    brightness[mitotic, 0] *= 1.8

    # ---- weighted Voronoi: each pixel belongs to the cell with the smallest normalised distance ---
    best = np.full((size, size), np.inf, dtype=f32)
    lab = np.full((size, size), n, dtype=np.intp)  # n = background (dummy row in the tables)
    coords = np.arange(size, dtype=f32)
    # boundary roughness scales rho by >= 1 - 2 * irregularity (noise clipped at 2 sd): windows cover that
    reach = np.maximum(A, B) / (1.0 - 2.0 * min(pheno.irregularity, 0.4)) + 2.0
    iA2, iB2 = (1.0 / A**2).astype(f32), (1.0 / B**2).astype(f32)
    for k in range(n):
        cx, cy = centres[k]
        x0, x1 = max(int(cx - reach[k]), 0), min(int(cx + reach[k]) + 2, size)
        y0, y1 = max(int(cy - reach[k]), 0), min(int(cy + reach[k]) + 2, size)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = coords[x0:x1] - f32(cx)
        dy = coords[y0:y1, None] - f32(cy)
        u = dx * f32(cos_t[k]) + dy * f32(sin_t[k])
        v = dy * f32(cos_t[k]) - dx * f32(sin_t[k])
        r2 = u * u * iA2[k] + v * v * iB2[k]
        bv, lv = best[y0:y1, x0:x1], lab[y0:y1, x0:x1]
        m = r2 < bv
        np.copyto(bv, r2, where=m)
        np.copyto(lv, k, where=m)

    def table(values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return np.append(values.astype(f32), f32(fill))[lab]

    # ---- per-pixel geometry in the owning cell's frame ---------------------------------------------
    dx = coords[None, :] - table(centres[:, 0])
    dy = coords[:, None] - table(centres[:, 1])
    ct, st = table(cos_t, 1.0), table(sin_t)
    u = dx * ct + dy * st - table(nuc_off)
    v = dy * ct - dx * st
    rn = np.sqrt(u * u / table(a**2, 1.0) + v * v / table(b**2, 1.0))
    rho = np.sqrt(best)
    coarse = _smooth_noise(rng, size, max(radius * 0.45, 1.0))
    fine = _smooth_noise(rng, size, 0.9 * s)
    reticulum = _smooth_noise(rng, size, 1.8 * s)
    rho_e = rho * (1.0 + min(pheno.irregularity, 0.4) * np.clip(coarse, -2.0, 2.0))
    cell = (rho_e < 1.0) & (lab < n)
    nucleus = cell & (rn * (1.0 + 0.04 * coarse) < 1.0)
    cellf, nucf = cell.astype(f32), nucleus.astype(f32)

    # membrane: distance to the nearest cell border (between cells or to background)
    edge = np.zeros_like(cell)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    interior = (cell & ~edge).astype(np.uint8)
    dist = cv2.distanceTransform(interior, cv2.DIST_L2, 3)
    membrane = np.exp(-((dist / (0.9 * s)) ** 2)) * cellf

    # distance outward from the nucleus, relative to the ER/cytoplasm decay length
    out_nuc = np.maximum(rn - 1.0, 0.0) * table(np.sqrt(a * b)) / table(pheno.er_spread * r_cell, 1.0)
    perinuclear = np.exp(-out_nuc) * cellf

    # ---- point-like structures: nucleoli (RNA) and mitochondria (Mito) ----------------------------
    def splat(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Point sources -> image (points outside the field are dropped, not piled on the border)."""
        xi, yi = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        flat = np.bincount(yi[ok] * size + xi[ok], weights=weights[ok], minlength=size * size)
        return flat.astype(f32).reshape(size, size)

    def rotate(k: np.ndarray, uu: np.ndarray, vv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (centres[k, 0] + uu * cos_t[k] - vv * sin_t[k], centres[k, 1] + uu * sin_t[k] + vv * cos_t[k])

    n_nucleoli = np.where(mitotic, 0, rng.poisson(pheno.nucleoli, n) + (pheno.nucleoli >= 1.0))
    kk = np.repeat(np.arange(n), n_nucleoli)
    t, phi = np.sqrt(rng.random(kk.size)) * 0.55, rng.uniform(0, 2 * math.pi, kk.size)
    nx, ny = rotate(kk, nuc_off[kk] + t * a[kk] * np.cos(phi), t * b[kk] * np.sin(phi))
    sigma_nl = max(0.5, 0.16 * float(np.median(r_nuc)) if n else 1.0)
    amp = rng.uniform(0.6, 1.3, kk.size) * brightness[kk, 2] * (2 * math.pi * sigma_nl**2)
    nucleoli = cv2.GaussianBlur(splat(nx, ny, amp), (0, 0), sigma_nl) * nucf

    cyto_area = np.pi * (A * B - a * b) / s**2  # in nominal px^2, so counts do not depend on the size
    n_mito = rng.poisson(pheno.mito_density * np.maximum(cyto_area, 0.0))
    kk = np.repeat(np.arange(n), n_mito)
    inner = (np.sqrt(a * b) / r_cell)[kk]
    t = inner + (1.0 - inner) * rng.beta(1.4, 2.2, kk.size)
    phi = rng.uniform(0, 2 * math.pi, kk.size)
    mx, my = rotate(kk, t * A[kk] * np.cos(phi), t * B[kk] * np.sin(phi))
    tub = rng.random(kk.size) < pheno.tubular
    lines = np.zeros((size, size), np.uint8)
    if tub.any():
        ln = rng.uniform(1.0, 2.5, int(tub.sum())) * s
        ang = phi[tub] + math.pi / 2 + rng.normal(0, 0.6, ln.size)
        p0 = np.stack([mx[tub] - ln * np.cos(ang), my[tub] - ln * np.sin(ang)], 1)
        p1 = np.stack([mx[tub] + ln * np.cos(ang), my[tub] + ln * np.sin(ang)], 1)
        segs = np.round(np.stack([p0, p1], 1) * 16).astype(np.int32)  # 4 fractional bits
        cv2.polylines(lines, list(segs), False, 255, 1, cv2.LINE_AA, 4)
    sigma_m = max(0.45, 0.55 * s)
    amp = rng.uniform(0.5, 1.5, int((~tub).sum())) * (2 * math.pi * sigma_m**2)
    mito = splat(mx[~tub], my[~tub], amp)
    mito += lines.astype(f32) * f32(0.6 / 255.0)
    mito = cv2.GaussianBlur(mito, (0, 0), sigma_m) * table(brightness[:, 4]) * cellf

    # ---- actin fibres (AGP) along the cells' major axes -------------------------------------------
    n_fib = np.where(mitotic, 0, rng.poisson(pheno.fibers, n))
    kk = np.repeat(np.arange(n), n_fib)
    fibers = np.zeros((size, size), np.uint8)
    if kk.size:
        off = rng.uniform(-0.7, 0.7, kk.size) * B[kk]
        along = rng.uniform(-0.3, 0.3, kk.size) * A[kk]
        half = rng.uniform(0.5, 0.95, kk.size) * A[kk]
        tilt = rng.normal(0, 0.2, kk.size)
        fx, fy = rotate(kk, along, off)
        ang = theta[kk] + tilt
        p0 = np.stack([fx - half * np.cos(ang), fy - half * np.sin(ang)], 1)
        p1 = np.stack([fx + half * np.cos(ang), fy + half * np.sin(ang)], 1)
        segs = np.round(np.stack([p0, p1], 1) * 16).astype(np.int32)
        cv2.polylines(fibers, list(segs), False, 160, max(1, int(round(0.6 * s))), cv2.LINE_AA, 4)
    fiber_img = fibers.astype(f32) * f32(1.0 / 255.0) * cellf

    # ---- compose the five stains (arbitrary units ~[0, 1]) ---------------------------------------
    dome = np.sqrt(np.clip(1.0 - rn * rn, 0.0, 1.0))
    chrom = np.clip(1.0 + pheno.chromatin * fine * 1.6, 0.2, None)
    nucleolus_holes = 1.0 - 0.55 * np.clip(nucleoli, 0.0, 1.0)
    dna = nucf * table(brightness[:, 0]) * (0.55 + 0.45 * dome) * chrom * nucleolus_holes * pheno.dna_gain

    ridges = 0.3 + 0.7 * np.exp(-((reticulum / 0.45) ** 2))
    er = perinuclear * (0.15 + 0.85 * ridges) * (1.0 - 0.75 * nucf) + 0.08 * cellf
    er *= table(brightness[:, 1])

    rna = (0.9 * nucleoli + 0.22 * nucf + 0.3 * perinuclear * (1.0 - nucf) * (0.8 + 0.2 * fine)) * table(
        brightness[:, 2])

    agp = (0.12 * cellf + 0.75 * membrane + 0.55 * fiber_img) * table(brightness[:, 3]) * (
        0.85 + 0.15 * coarse)

    stains = np.stack([dna, er, rna, agp, mito + 0.05 * cellf]).astype(f32)
    psf = 0.45 * s
    for c in range(5):
        stains[c] = cv2.GaussianBlur(stains[c], (0, 0), psf)

    # ---- imaging: background, vignetting, shot + read noise ----------------------------------------
    vig = rng.uniform(0.08, 0.2)
    ccx, ccy = (0.5 + rng.uniform(-0.1, 0.1, 2)) * size
    rx = ((coords - f32(ccx)) / f32(size)) ** 2
    ry = ((coords - f32(ccy)) / f32(size)) ** 2
    illum = 1.0 - f32(2 * vig) * (rx[None, :] + ry[:, None])
    background = rng.uniform(60.0, 140.0, 5).astype(f32)
    gain = _PEAK_PHOTONS * (plate_gain if plate_gain is not None else 1.0)
    photons = illum[None] * (background[:, None, None] + gain[:, None, None].astype(f32) * stains)
    noise = rng.standard_normal(photons.shape, dtype=f32)
    adu = photons + np.sqrt(photons + f32(_READ_NOISE**2)) * noise + f32(_CAMERA_OFFSET)
    image = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
    if with_masks:
        return image, instance_masks(lab, cell, nucleus, n)
    return image


def instance_masks(owner: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Instance labels (0 = background) of the cells and nuclei of one rendered field.

    ``owner`` is the weighted-Voronoi cell index of each pixel (``n`` = none), ``cell``/``nucleus`` the
    pixels drawn as cytoplasm / nucleus before blurring.  Cells are numbered 1.. in the order they
    first appear in the field (row-major); a nucleus carries the number of its cell, as CellProfiler
    numbers nuclei and the cells grown from them, so a cell whose nucleus lies outside the field has
    no nucleus.  uint16, or uint32 past 65535 objects.
    """
    ids = np.where(cell, owner, n)
    present, first = np.unique(ids.ravel(), return_index=True)
    present, first = present[present < n], first[present < n]
    order = present[np.argsort(first, kind="stable")]
    lut = np.zeros(n + 1, dtype=np.int64)
    lut[order] = np.arange(1, order.size + 1)
    dtype = np.uint16 if order.size <= np.iinfo(np.uint16).max else np.uint32
    cells = lut[ids].astype(dtype)
    nuclei = np.where(nucleus, cells, 0).astype(dtype)
    return {"nuclei": nuclei, "cells": cells}
