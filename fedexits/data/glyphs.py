"""Glyph prototypes for the synthetic FEMNIST-like population.

Each (font, character) pair is rendered once, at a resolution above the final 28x28, from the
fonts matplotlib ships (so generation needs no download and no system fonts), thinned to its centre
line and stored as a distance field. Samples are later warped out of these prototypes with batched
torch ops and drawn with a writer's pen width (see `synthetic.py`), which is what makes generating
~100k images take seconds rather than minutes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fedexits.data.base import DataError

# FEMNIST/LEAF label order: 0-9, A-Z, a-z.
CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NUM_CLASSES = len(CHARACTERS)

# Text fonts from matplotlib's mpl-data/fonts/ttf. The first one is the "base" style that every
# writer shares when style_strength = 0. Display/symbol fonts are left out: they lack letters.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)

PROTOTYPE_SIZE = 48  # prototype canvas side; it maps onto the 28x28 output
CAP_HEIGHT = 0.40  # height of a capital letter as a fraction of the canvas (11.2 px of 28); on the
# LEAF sample, character boxes are 10.5 px tall on average (lower case included), here 10.9 px
OUTPUT_SIZE = 28
INK_THRESHOLD = 0.3  # binarising the anti-aliased glyph before thinning keeps thin serif strokes


def font_dir() -> str:
    """matplotlib's mpl-data/fonts/ttf, found without importing matplotlib (~90 ms): building a
    population from an existing cache must stay cheap."""
    package = importlib.util.find_spec("matplotlib").submodule_search_locations[0]
    return os.path.join(package, "mpl-data", "fonts", "ttf")


def matplotlib_version() -> str:
    return importlib.metadata.version("matplotlib")


def available_fonts() -> list[str]:
    """The FONT_FILES present in this matplotlib install (all of them in matplotlib >= 3.7)."""
    fonts = [name for name in FONT_FILES if os.path.exists(os.path.join(font_dir(), name))]
    if not fonts:
        raise DataError(f"no fonts for synthetic data in {font_dir()}; expected {FONT_FILES[0]}")
    return fonts


def _render(font, char: str, size_px: float) -> np.ndarray:
    from matplotlib.ft2font import LoadFlags

    font.set_size(size_px, 72)  # at 72 dpi one point is one pixel
    font.set_text(char, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    image = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    rows = np.flatnonzero(image.max(axis=1) > 0.05)
    cols = np.flatnonzero(image.max(axis=0) > 0.05)
    if rows.size == 0:
        return np.zeros((1, 1), np.float32)
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _render_font(path: str) -> np.ndarray:
    """All 62 characters of one font, ink bright, centred by bounding box on a square canvas.

    The font size is chosen so that 'H' has the same height in every font, which keeps the natural
    relative sizes inside a font (lower case smaller than capitals, descenders below).
    """
    from matplotlib.ft2font import FT2Font

    font = FT2Font(path)
    reference = 200.0
    cap_height = _render(font, "H", reference).shape[0]
    size_px = reference * CAP_HEIGHT * PROTOTYPE_SIZE / cap_height
    canvas = np.zeros((NUM_CLASSES, PROTOTYPE_SIZE, PROTOTYPE_SIZE), np.float32)
    limit = PROTOTYPE_SIZE - 4
    for index, char in enumerate(CHARACTERS):
        glyph = _render(font, char, size_px)
        height, width = glyph.shape
        if max(height, width) > limit:  # very wide glyphs (W, m in some fonts): shrink to fit
            shrink = limit / max(height, width)
            glyph = _render(font, char, size_px * shrink)
            height, width = glyph.shape
        top = (PROTOTYPE_SIZE - height) // 2
        left = (PROTOTYPE_SIZE - width) // 2
        canvas[index, top : top + height, left : left + width] = glyph
    return canvas


def _zhang_suen_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """For each 8-neighbourhood code (bit k = neighbour P(k+2), clockwise from north), whether
    Zhang-Suen thinning removes the centre pixel in its first and in its second sub-iteration."""
    first, second = torch.zeros(256, dtype=torch.bool), torch.zeros(256, dtype=torch.bool)
    for code in range(256):
        p = [(code >> k) & 1 for k in range(8)]  # P2, P3, ..., P9
        count = sum(p)
        transitions = sum(p[k] == 0 and p[(k + 1) % 8] == 1 for k in range(8))
        if 2 <= count <= 6 and transitions == 1:
            p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
            first[code] = p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
            second[code] = p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
    return first, second


def skeletonize(binary: torch.Tensor) -> torch.Tensor:
    """1-px-wide skeletons of (N, H, W) binary images (Zhang-Suen thinning, batched).

    Each pass codes every pixel's 8 neighbours as a byte with one convolution and looks the
    removal decision up in a 256-entry table; images stop being processed once they are thin.
    """
    weights = torch.zeros(1, 1, 3, 3)
    clockwise_from_north = [(0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]
    for bit, (dy, dx) in enumerate(clockwise_from_north):
        weights[0, 0, dy, dx] = 2**bit
    tables = _zhang_suen_tables()
    images = binary.float().unsqueeze(1)
    active = torch.arange(len(images))
    while len(active):
        subset = images[active]
        changed = torch.zeros(len(active), dtype=torch.bool)
        for table in tables:
            code = F.conv2d(subset, weights, padding=1).long()
            remove = table[code] & (subset > 0)
            changed |= remove.flatten(1).any(1)
            subset = subset.masked_fill(remove, 0.0)
        images[active] = subset
        active = active[changed]
    return images.squeeze(1) > 0


def distance_to_skeleton(skeletons: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(N, S, S) exact Euclidean distance, in pixels, to the nearest skeleton pixel.

    Squared distance is separable: a min-plus "convolution" with a parabola along y, then along x,
    each done by brute force over all S source positions (S is small).
    """
    count, size, _ = skeletons.shape
    coords = torch.arange(size, dtype=torch.float32)
    parabola = (coords[:, None] - coords[None, :]) ** 2  # (target, source)
    far = float(8 * size * size)
    distances = torch.empty(count, size, size)
    for start in range(0, count, chunk):
        f = torch.where(skeletons[start : start + chunk], 0.0, far)  # (n, y, x)
        along_y = (f[:, None, :, :] + parabola[None, :, :, None]).amin(2)
        along_x = (along_y[:, :, None, :] + parabola[None, None, :, :]).amin(3)
        distances[start : start + chunk] = along_x.sqrt()
    return distances


@lru_cache(maxsize=2)
def glyph_prototypes(fonts: tuple[str, ...]) -> torch.Tensor:
    """(num_fonts, 62, S, S) float32: distance (in output pixels) to each glyph's centre line.

    Fonts have thick and thin parts; handwriting has one pen width. So every glyph is thinned to
    its centre line, and a sample draws the warped centre line with its writer's pen:
    ink = sigmoid((stroke_width / 2 - distance) / softness), a continuous stroke-width control.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib warns per missing glyph; none are missing
        rendered = np.stack([_render_font(os.path.join(font_dir(), name)) for name in fonts])
    binary = torch.from_numpy(rendered > INK_THRESHOLD).flatten(0, 1)
    distances = distance_to_skeleton(skeletonize(binary)) * (OUTPUT_SIZE / PROTOTYPE_SIZE)
    return distances.view(len(fonts), NUM_CLASSES, PROTOTYPE_SIZE, PROTOTYPE_SIZE).contiguous()
