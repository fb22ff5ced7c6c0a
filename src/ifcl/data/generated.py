"""Deterministic procedural image datasets (numpy + Pillow only).

Three domains that look unlike each other, each a catalogue of human-readable, compositional classes:

* ``shapes``   -- "<colour> <shape>", one object on a dark noisy background (10 colours x 8 shapes = 80)
* ``textures`` -- "<colour> <pattern>", a full-image periodic pattern (8 colours x 6 patterns = 48)
* ``glyphs``   -- "the digit 3" / "the letter K", hand-defined stroke glyphs (10 digits + 16 letters = 26)

Every image is drawn at 4x resolution and box-downsampled in numpy, then gets pixel noise.  All randomness
comes from ``numpy.random.Generator(PCG64(seed))`` streams whose seeds are derived from strings with sha256,
and geometry uses Python floats (no platform-dependent vectorised transcendental functions), so the same
arguments give the same pixels everywhere and, with the same Pillow/zlib build, byte-identical PNG files.

A configured dataset of type ``generated`` (one ``domain`` + ``classes``, or several ``parts``) is drawn and listed
by :func:`generated_manifests`.
"""
from __future__ import annotations

import colorsys
import hashlib
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .manifest import DatasetError

DOMAINS: tuple[str, ...] = ("shapes", "textures", "glyphs")

_SS = 4  # supersampling factor

# name -> (hue, saturation, value) in [0, 1]; hue jitter is small so colours stay apart (min gap ~0.07)
_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.95, 0.95), "orange": (0.075, 1.0, 1.0), "yellow": (0.155, 0.95, 1.0),
    "green": (0.33, 0.9, 0.85), "cyan": (0.5, 0.85, 0.95), "blue": (0.62, 0.95, 1.0),
    "purple": (0.76, 0.8, 0.85), "magenta": (0.87, 0.9, 1.0), "white": (0.0, 0.0, 1.0),
    "brown": (0.065, 0.8, 0.5),
}
_TEXTURE_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "magenta", "white")
_SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")
_PATTERNS = ("stripes", "checkerboard", "dots", "waves", "grid", "zigzag")

# Stroke glyphs: polylines in a unit box (x right, y down).
_GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "0": [[(.3, 0), (.7, 0), (1, .25), (1, .75), (.7, 1), (.3, 1), (0, .75), (0, .25), (.3, 0)]],
    "1": [[(.2, .2), (.55, 0), (.55, 1)], [(.2, 1), (.9, 1)]],
    "2": [[(0, .25), (.25, 0), (.75, 0), (1, .25), (1, .4), (0, 1), (1, 1)]],
    "3": [[(0, .1), (.2, 0), (.8, 0), (1, .2), (1, .35), (.8, .5), (.35, .5)],
          [(.8, .5), (1, .65), (1, .8), (.8, 1), (.2, 1), (0, .9)]],
    "4": [[(.75, 1), (.75, 0), (0, .7), (1, .7)]],
    "5": [[(1, 0), (0, 0), (0, .45), (.7, .45), (1, .65), (1, .8), (.75, 1), (0, 1)]],
    "6": [[(.9, 0), (.3, 0), (0, .3), (0, .8), (.2, 1), (.8, 1), (1, .8), (1, .6), (.8, .45), (0, .45)]],
    "7": [[(0, 0), (1, 0), (.35, 1)]],
    "8": [[(.2, 0), (.8, 0), (.95, .15), (.95, .3), (.8, .45), (.2, .45), (.05, .3), (.05, .15), (.2, 0)],
          [(.2, .45), (0, .6), (0, .85), (.2, 1), (.8, 1), (1, .85), (1, .6), (.8, .45)]],
    "9": [[(.1, 1), (.7, 1), (1, .7), (1, .2), (.8, 0), (.2, 0), (0, .2), (0, .4), (.2, .55), (1, .55)]],
    "A": [[(0, 1), (.5, 0), (1, 1)], [(.22, .6), (.78, .6)]],
    "C": [[(1, .1), (.9, 0), (.3, 0), (0, .3), (0, .7), (.3, 1), (.9, 1), (1, .9)]],
    "E": [[(1, 0), (0, 0), (0, 1), (1, 1)], [(0, .5), (.75, .5)]],
    "F": [[(1, 0), (0, 0), (0, 1)], [(0, .5), (.75, .5)]],
    "H": [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(0, .5), (1, .5)]],
    "K": [[(0, 0), (0, 1)], [(1, 0), (0, .6)], [(.3, .4), (1, 1)]],
    "L": [[(0, 0), (0, 1), (1, 1)]],
    "M": [[(0, 1), (0, 0), (.5, .6), (1, 0), (1, 1)]],
    "N": [[(0, 1), (0, 0), (1, 1), (1, 0)]],
    "P": [[(0, 1), (0, 0), (.8, 0), (1, .15), (1, .4), (.8, .55), (0, .55)]],
    "T": [[(0, 0), (1, 0)], [(.5, 0), (.5, 1)]],
    "U": [[(0, 0), (0, .75), (.25, 1), (.75, 1), (1, .75), (1, 0)]],
    "V": [[(0, 0), (.5, 1), (1, 0)]],
    "X": [[(0, 0), (1, 1)], [(1, 0), (0, 1)]],
    "Y": [[(0, 0), (.5, .5), (1, 0)], [(.5, .5), (.5, 1)]],
    "Z": [[(0, 0), (1, 0), (0, 1), (1, 1)]],
}


def _seed(*parts: object) -> int:
    """Stable 64-bit integer from the string form of ``parts`` (first 8 bytes of sha256)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(_seed(*parts)))


def _catalogue(domain: str) -> dict[str, tuple[str, str]]:
    """Class name -> (attribute 1, attribute 2) in catalogue order (fixed pseudo-random permutation)."""
    if domain == "shapes":
        combos = [(c, s, f"{c} {s}") for c in _COLOURS for s in _SHAPES]
    elif domain == "textures":
        combos = [(c, p, f"{c} {p}") for c in _TEXTURE_COLOURS for p in _PATTERNS]
    elif domain == "glyphs":
        combos = [("", g, f"the {'digit' if g.isdigit() else 'letter'} {g}") for g in _GLYPHS]
    else:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    order = _rng("class-order", domain).permutation(len(combos))
    return {combos[i][2]: combos[i][:2] for i in order}


def class_names(domain: str) -> list[str]:
    """All class names of a domain in a fixed, deterministic order (a fixed pseudo-random permutation of the
    attribute combinations, so that slices [0:k] mix attributes). Unknown domain -> ValueError naming the valid ones."""
    return list(_catalogue(domain))


def class_slice(domain: str, start: int, count: int) -> list[str]:
    """class_names(domain)[start:start+count]; ValueError with a clear message if the slice runs past the catalogue
    (say how many classes the domain has)."""
    names = class_names(domain)
    if start < 0 or count < 0 or start + count > len(names):
        raise ValueError(f"class slice [{start}:{start + count}] is outside domain {domain!r}, "
                         f"which has {len(names)} classes (valid: 0 <= start, start + count <= {len(names)})")
    return names[start:start + count]


def _jitter_colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random shade of a named colour: small hue shift, saturation/value jitter that keeps it recognisable."""
    h, s, v = _COLOURS[name]
    h = (h + rng.uniform(-0.018, 0.018)) % 1.0
    s = rng.uniform(0.0, 0.12) if s == 0 else s * rng.uniform(0.85, 1.0)
    v = v * rng.uniform(0.82, 1.0)
    return tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _background(rng: np.random.Generator, n: int, v_lo: float, v_hi: float) -> np.ndarray:
    """Float [n, n, 3] background: a linear blend of two low-saturation colours along a random direction."""
    c0, c1 = (np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(v_lo, v_hi))) * 255
              for _ in range(2))
    a = rng.uniform(0, 2 * math.pi)
    t = (np.arange(n) + 0.5) / n
    ramp = np.clip(0.5 + (t[None, :] - 0.5) * math.cos(a) + (t[:, None] - 0.5) * math.sin(a), 0, 1)
    return c0 + ramp[..., None] * (c1 - c0)


def _finish(hi: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample a [size*_SS]^2 float image and add per-pixel noise -> uint8 [size, size, 3]."""
    img = hi.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    sigma = rng.uniform(3.0, 9.0)
    img = img + rng.normal(0.0, sigma, (size, size, 1)) + rng.normal(0.0, sigma / 2, (size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ~r centred at (cx, cy), rotated by rot radians."""
    if kind in ("triangle", "hexagon"):
        k = 3 if kind == "triangle" else 6
        pts = [(math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k)) for i in range(k)]
    elif kind == "square":
        pts = [(0.75, 0.75), (-0.75, 0.75), (-0.75, -0.75), (0.75, -0.75)]
    elif kind == "diamond":
        pts = [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]
    elif kind == "star":
        pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(math.pi * i / 5),
                (1.0 if i % 2 == 0 else 0.42) * math.sin(math.pi * i / 5)) for i in range(10)]
    elif kind == "cross":
        a = 0.3
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
               (-a, -a)]
    else:
        raise ValueError(f"not a polygon shape: {kind}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _render_shape(colour: str, shape: str, rng: np.random.Generator, size: int) -> np.ndarray:
    n = size * _SS
    bg = _background(rng, n, 0.04, 0.3)
    img = Image.fromarray(np.rint(bg).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if rng.uniform() < 0.5:  # small grey distractor blob, drawn first so the object may occlude it
        g = int(rng.uniform(70, 150))
        bx, by, br = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0.06, 0.12) * n
        draw.ellipse([bx - br, by - br * rng.uniform(0.6, 1.0), bx + br, by + br], fill=(g, g, g))
    fill = _jitter_colour(colour, rng)
    r = rng.uniform(0.28, 0.45) * n  # object diameter 55-90 % of the image
    cx, cy = rng.uniform(0.9 * r, n - 0.9 * r), rng.uniform(0.9 * r, n - 0.9 * r)
    rot = rng.uniform(-0.35, 0.35)  # +-20 degrees: a square stays a square, a diamond a diamond
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(round(r * 0.33))))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)
    return _finish(np.asarray(img, dtype=np.float64), size, rng)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _render_texture(colour: str, pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
    n = size * _SS
    bg = _background(rng, n, 0.03, 0.3)
    fg = np.array(_jitter_colour(colour, rng), dtype=np.float64)
    k = size / 32.0  # pattern periods are given for 32 px images
    a = rng.uniform(0, math.pi)
    t = (np.arange(n) + 0.5) / _SS
    x, y = t[None, :] - size / 2, t[:, None] - size / 2
    u = x * math.cos(a) + y * math.sin(a) + rng.uniform(0, 20)
    v = -x * math.sin(a) + y * math.cos(a) + rng.uniform(0, 20)
    if pattern == "stripes":
        mask = _frac(u / (k * rng.uniform(5, 8))) < rng.uniform(0.4, 0.6)
    elif pattern == "checkerboard":
        p = k * rng.uniform(4, 7)
        mask = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    elif pattern == "dots":
        p, rad = k * rng.uniform(6, 9), rng.uniform(0.22, 0.32)
        mask = (_frac(u / p) - 0.5) ** 2 + (_frac(v / p) - 0.5) ** 2 < rad ** 2
    elif pattern == "grid":
        p, w = k * rng.uniform(7, 10), rng.uniform(0.15, 0.25)
        mask = (_frac(u / p) < w) | (_frac(v / p) < w)
    elif pattern in ("waves", "zigzag"):
        q = _frac(v / (k * rng.uniform(10, 16) if pattern == "waves" else k * rng.uniform(7, 10)))
        if pattern == "waves":  # piecewise-parabolic sine look-alike (no platform-dependent np.sin)
            wave = np.where(q < 0.5, 16 * q * (0.5 - q), -16 * (q - 0.5) * (1 - q))
            amp = k * rng.uniform(1.5, 2.5)
        else:  # triangle wave: sharp corners
            wave = 1 - 4 * np.abs(q - 0.5)
            amp = k * rng.uniform(2.0, 3.0)
        mask = _frac((u + amp * wave) / (k * rng.uniform(6, 9))) < 0.5
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    m = mask[..., None].astype(np.float64)
    return _finish(bg * (1 - m) + fg * m, size, rng)


def _render_glyph(glyph: str, rng: np.random.Generator, size: int) -> np.ndarray:
    n = size * _SS
    light_on_dark = rng.uniform() < 0.5
    bg = _background(rng, n, *((0.03, 0.3) if light_on_dark else (0.7, 0.95)))
    ink_v = rng.uniform(0.75, 1.0) if light_on_dark else rng.uniform(0.05, 0.3)
    ink = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.6), ink_v))
    img = Image.fromarray(np.rint(bg).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    h = rng.uniform(0.55, 0.78) * n
    w = h * rng.uniform(0.55, 0.75)
    rot, shear = rng.uniform(-0.22, 0.22), rng.uniform(-0.15, 0.15)
    cx = n / 2 + rng.uniform(-0.1, 0.1) * n
    cy = n / 2 + rng.uniform(-0.1, 0.1) * n
    stroke = h * rng.uniform(0.09, 0.15)
    c, s = math.cos(rot), math.sin(rot)
    for line in _GLYPHS[glyph]:
        pts = []
        for gx, gy in line:
            x, y = (gx - 0.5) * w, (gy - 0.5) * h
            x += shear * y
            pts.append((cx + x * c - y * s, cy + x * s + y * c))
        draw.line(pts, fill=ink, width=max(1, int(round(stroke))), joint="curve")
        for px, py in pts:  # round caps and joints
            draw.ellipse([px - stroke / 2, py - stroke / 2, px + stroke / 2, py + stroke / 2], fill=ink)
    return _finish(np.asarray(img, dtype=np.float64), size, rng)


def render(domain: str, class_name: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image of that class: uint8 array [size, size, 3]. Draw at 4x resolution with PIL.ImageDraw and downsample
    (antialiasing) or any equivalent deterministic method."""
    catalogue = _catalogue(domain)
    if class_name not in catalogue:
        raise ValueError(f"unknown class {class_name!r} for domain {domain!r} ({len(catalogue)} classes, "
                         f"e.g. {', '.join(list(catalogue)[:3])})")
    if size < 4:
        raise ValueError(f"size must be >= 4, got {size}")
    a1, a2 = catalogue[class_name]
    if domain == "shapes":
        return _render_shape(a1, a2, rng, size)
    if domain == "textures":
        return _render_texture(a1, a2, rng, size)
    return _render_glyph(a2, rng, size)


def folder_name(class_name: str) -> str:
    """Folder name of a class: spaces replaced by underscores."""
    return class_name.replace(" ", "_")


def write_split(root: str | Path, domain: str, classes: list[str], n_per_class: int, size: int,
                seed: int | str) -> list[tuple[str, int, str]]:
    """Write root/<class folder>/<index:05d>.png for every class (folder name = class name with spaces replaced by
    '_'), return rows (relative path 'folder/00000.png', label = position in `classes`, class name) in a fixed order.
    Image i of class c uses a rng seeded from (seed, domain, class name, i) via a stable integer derivation (e.g. the
    first 8 bytes of sha256 of a string), so adding classes or images never changes existing images."""
    if len(set(classes)) != len(classes):
        raise ValueError("classes must be unique")
    root = Path(root)
    rows: list[tuple[str, int, str]] = []
    for label, name in enumerate(classes):
        folder = root / folder_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = render(domain, name, _rng("image", seed, domain, name, i), size)
            rel = f"{folder_name(name)}/{i:05d}.png"
            Image.fromarray(arr).save(root / rel, format="PNG", optimize=False, compress_level=6)
            rows.append((rel, label, name))
    return rows


def generated_parts(spec: dict) -> list[dict]:
    """The class slices of a generated dataset: ``parts`` (several domains, labels in the listed order), or the
    single ``domain`` + ``classes``."""
    if "parts" in spec:
        return spec["parts"]
    return [{"domain": spec["domain"], **spec["classes"]}]


def generated_manifests(root: str | Path, spec: dict) -> dict[str, list[tuple[str, int, str]]]:
    """Draw a generated dataset (``spec`` as in the config) into ``root/{train,test}/`` and return its manifests."""
    out: dict[str, list] = {"train": [], "test": []}
    offset, seen = 0, set()
    for part in generated_parts(spec):
        classes = class_slice(part["domain"], part["start"], part["count"])
        if seen & set(classes):
            raise DatasetError(f"generated dataset: classes {sorted(seen & set(classes))} appear in two parts")
        seen.update(classes)
        draws = [("train", spec["train_per_class"], spec["seed"] * 2), ("test", spec["test_per_class"], spec["seed"] * 2 + 1)]
        if spec.get("val_per_class"):
            draws.append(("val", spec["val_per_class"], f"{spec['seed']}-val"))
        for split, n, seed in draws:
            rows = write_split(Path(root) / split, part["domain"], classes, n, spec["image_size"], seed)
            out.setdefault(split, [])
            out[split] += [(os.path.join(str(root), split, rel), offset + label, name) for rel, label, name in rows]
        offset += len(classes)
    return out
