"""Offline FEMNIST-like population: 62 handwriting-like classes from fonts, one style per writer.

A writer's style is persistent: a font, slant, rotation, scale, aspect, position habit, stroke
width, ink intensity, pixel noise, and a fixed smooth distortion of each character (how *this*
writer draws an 'a'). Every image is that writer's version of a glyph prototype, varied per sample
(pose, distortion, stroke) by `sample_jitter`. `style_strength` scales how far writers' styles
are from the shared base style; `label_skew` scales how far a writer's class frequencies are from
the global FEMNIST-like prior.

All randomness about writer w comes from generators seeded with (seed, w), so a writer looks the
same whatever num_writers is. Pixels come out of large batches: one matmul builds every sampling
grid (affine pose + elastic field), grid_sample warps the glyphs, a sigmoid sets the stroke.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fedexits.data.cache import CacheWriter, ImageCache, open_or_build
from fedexits.data.config import SyntheticConfig
from fedexits.data.glyphs import (
    NUM_CLASSES,
    PROTOTYPE_SIZE,
    available_fonts,
    glyph_prototypes,
    matplotlib_version,
)
from fedexits.data.split import rng_for

GENERATOR_VERSION = 1  # bump when the images a config produces change

# Global class prior: class counts of the real LEAF FEMNIST sample (198 writers, 18,879 images;
# ../shared/data/femnist-leaf-sample). Digits are 64% of the images, upper and lower case ~18% each.
FEMNIST_CLASS_COUNTS = np.array([
    1197, 1338, 1202, 1232, 1172, 1113, 1200, 1262, 1187, 1194,  # 0-9
    129, 107, 154, 115, 117, 153, 87, 103, 194, 104, 91, 135, 162,  # A-M
    153, 277, 141, 94, 125, 242, 167, 192, 114, 113, 98, 103, 105,  # N-Z
    156, 107, 88, 162, 295, 91, 101, 151, 88, 66, 88, 230, 97,  # a-m
    151, 96, 88, 78, 173, 96, 212, 102, 106, 97, 97, 85, 106,  # n-z
], dtype=np.float64)  # fmt: skip
FEMNIST_CLASS_PRIOR = FEMNIST_CLASS_COUNTS / FEMNIST_CLASS_COUNTS.sum()

OUTPUT_SIZE = 28
RENDER_SIZE = 56  # samples are rendered at 2x and area-downsampled: smooth, anti-aliased edges
FIELD_GRID = 4  # elastic distortions are a 4x4 grid of random displacements, upsampled bicubic
PX = 2.0 / OUTPUT_SIZE  # one output pixel in grid_sample's normalised [-1, 1] coordinates
BATCH = 2048
EDGE_SOFTNESS = 0.12  # px: sigmoid width of a stroke's edge (before the 2x area downsampling)

# Writer style at style_strength = 1: standard deviations (or means) of each style parameter.
STYLE = {
    "slant": 0.18,  # horizontal shear
    "rotation": 0.07,  # radians (~4 degrees)
    "log_scale": 0.10,
    "log_aspect": 0.10,
    "shift": 0.8,  # px
    "log_stroke_width": 0.25,
    "distortion": 1.0,  # px, per (writer, class) persistent displacement
    "faintness": 0.10,  # how much lighter than full ink a writer's strokes are
    "noise": 0.01,  # extra pixel noise sd
}
BASE_STROKE_WIDTH = 1.3  # px pen width of the shared base style: 4.1% of pixels > 0.5 (LEAF: 4.0%)
BASE_NOISE = 0.0
# Per-sample variation at sample_jitter = 1 (same meaning as above).
JITTER = {
    "rotation": 0.05,
    "log_scale": 0.06,
    "shift": 0.7,
    "log_stroke_width": 0.08,
    "distortion": 0.6,
}


def writer_ids(num_writers: int) -> list[str]:
    return [f"w{index:04d}" for index in range(num_writers)]


def writer_style(cfg: SyntheticConfig, writer: int, num_fonts: int) -> dict[str, float]:
    """The persistent style of one writer (scalars); the shared base style when strength is 0."""
    rng = rng_for(cfg.seed, "synthetic-style", writer)
    s = cfg.style_strength
    draws = rng.standard_normal(9)
    own_font = int(rng.integers(num_fonts))
    uses_own_font = rng.random() < min(1.0, s)
    return {
        "font": own_font if uses_own_font else 0,
        "slant": s * STYLE["slant"] * draws[0],
        "rotation": s * STYLE["rotation"] * draws[1],
        "log_scale": s * STYLE["log_scale"] * draws[2],
        "log_aspect": s * STYLE["log_aspect"] * draws[3],
        "shift_x": s * STYLE["shift"] * draws[4],
        "shift_y": s * STYLE["shift"] * draws[5],
        "log_stroke_width": s * STYLE["log_stroke_width"] * draws[6],
        "ink": float(np.clip(1.0 - s * STYLE["faintness"] * abs(draws[7]), 0.5, 1.0)),
        "noise": BASE_NOISE + s * STYLE["noise"] * abs(draws[8]),
        "distortion": s * STYLE["distortion"],
    }


def writer_class_prior(cfg: SyntheticConfig, writer: int) -> np.ndarray:
    """The writer's class frequencies: the global prior, or a Dirichlet draw around it."""
    if cfg.label_skew == 0:
        return FEMNIST_CLASS_PRIOR
    rng = rng_for(cfg.seed, "synthetic-classes", writer)
    probabilities = rng.dirichlet(NUM_CLASSES * FEMNIST_CLASS_PRIOR / cfg.label_skew)
    if not np.isfinite(probabilities).all() or probabilities.sum() <= 0:  # extreme skew underflow
        probabilities = np.eye(NUM_CLASSES)[rng.choice(NUM_CLASSES, p=FEMNIST_CLASS_PRIOR)]
    return probabilities / probabilities.sum()


def _affine(rotation, log_scale, log_aspect, slant) -> np.ndarray:
    """(n, 2, 2) glyph -> image linear maps: rotate . shear . scale (x, y order of affine_grid)."""
    cos, sin = np.cos(rotation), np.sin(rotation)
    scale = np.exp(log_scale)
    sx, sy = scale * np.exp(log_aspect), scale * np.ones_like(log_aspect)
    rotate = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear_scale = np.stack([np.stack([sx, slant * sy], -1), np.stack([np.zeros_like(sx), sy], -1)], -2)
    return rotate @ shear_scale


def writer_samples(cfg: SyntheticConfig, writer: int, num_fonts: int) -> dict[str, np.ndarray]:
    """Labels and per-sample rendering parameters of all of one writer's images."""
    style = writer_style(cfg, writer, num_fonts)
    rng = rng_for(cfg.seed, "synthetic-samples", writer)
    count = round(float(rng.normal(cfg.images_per_writer_mean, cfg.images_per_writer_sd)))
    count = max(cfg.images_per_writer_min, count)
    labels = rng.choice(NUM_CLASSES, size=count, p=writer_class_prior(cfg, writer))
    j = cfg.sample_jitter
    draws = rng.standard_normal((5, count))
    linear = _affine(
        np.full(count, style["rotation"]),
        np.full(count, style["log_scale"]),
        np.full(count, style["log_aspect"]),
        np.full(count, style["slant"]),
    ) @ _affine(
        j * JITTER["rotation"] * draws[0],
        j * JITTER["log_scale"] * draws[1],
        np.zeros(count),
        np.zeros(count),
    )
    shift = (
        np.stack(
            [
                style["shift_x"] + j * JITTER["shift"] * draws[2],
                style["shift_y"] + j * JITTER["shift"] * draws[3],
            ],
            -1,
        )
        * PX
    )
    # affine_grid wants image -> glyph coordinates: the inverse of glyph -> image.
    inverse = np.linalg.inv(linear)
    theta = np.concatenate([inverse, -(inverse @ shift[..., None])], -1)
    class_fields = rng.standard_normal((NUM_CLASSES, 2, FIELD_GRID, FIELD_GRID))
    sample_fields = rng.standard_normal((count, 2, FIELD_GRID, FIELD_GRID))
    fields = (style["distortion"] * class_fields[labels] + j * JITTER["distortion"] * sample_fields) * PX
    log_width = style["log_stroke_width"] + j * JITTER["log_stroke_width"] * draws[4]
    stroke_width = np.clip(BASE_STROKE_WIDTH * np.exp(log_width), 0.5, 4.0)
    return {
        "labels": labels,
        "font": np.full(count, style["font"]),
        "theta": theta.astype(np.float32),
        "fields": fields.astype(np.float32),
        "stroke_width": stroke_width.astype(np.float32),
        "ink": np.full(count, style["ink"], np.float32),
        "noise": np.full(count, style["noise"], np.float32),
        "noise_seed": np.full(count, rng.integers(2**62)),
    }


@lru_cache(maxsize=1)
def _grid_basis() -> torch.Tensor:
    """(RENDER_SIZE**2, 3 + FIELD_GRID**2): output pixel -> [x, y, 1, bicubic field weights].

    A sample's sampling grid is this basis times its coefficients [affine theta | displacement
    field], so the affine map and the upsampled elastic field come out of one batched matmul.
    """
    coords = torch.linspace(-1 + 1 / RENDER_SIZE, 1 - 1 / RENDER_SIZE, RENDER_SIZE)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    eye = torch.eye(FIELD_GRID).view(FIELD_GRID, 1, 1, FIELD_GRID)
    weights = F.interpolate(eye, size=(1, RENDER_SIZE), mode="bicubic", align_corners=True)
    weights = weights.view(FIELD_GRID, RENDER_SIZE)  # (control point, pixel) along one axis
    field = torch.einsum("gy,hx->yxgh", weights, weights).reshape(RENDER_SIZE**2, -1)
    return torch.cat([x.reshape(-1, 1), y.reshape(-1, 1), torch.ones(RENDER_SIZE**2, 1), field], 1)


def render(prototypes: torch.Tensor, samples: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 (n, 28, 28) images, ink bright, from per-sample parameters (one batch)."""
    count = len(samples["labels"])
    glyphs = prototypes[torch.from_numpy(samples["font"]), torch.from_numpy(samples["labels"])]
    coefficients = torch.cat(
        [torch.from_numpy(samples["theta"]), torch.from_numpy(samples["fields"]).flatten(2)], 2
    )
    grid = torch.matmul(_grid_basis(), coefficients.transpose(1, 2))  # (n, pixels, 2)
    grid = grid.view(count, RENDER_SIZE, RENDER_SIZE, 2)
    distance = F.grid_sample(
        glyphs.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    half_width = torch.from_numpy(samples["stroke_width"]).view(-1, 1, 1, 1) / 2
    ink = distance.sub_(half_width).div_(-EDGE_SOFTNESS).sigmoid_()
    ink = ink.mul_(torch.from_numpy(samples["ink"]).view(-1, 1, 1, 1))
    image = F.avg_pool2d(ink, RENDER_SIZE // OUTPUT_SIZE).squeeze(1)
    noise = torch.empty_like(image)
    for start, end, seed in _runs(samples["noise_seed"]):  # one noise stream per writer
        generator = torch.Generator().manual_seed(int(seed))
        noise[start:end].normal_(generator=generator)
    image = image.add_(noise.mul_(torch.from_numpy(samples["noise"]).view(-1, 1, 1)))
    return image.clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()


def _runs(values: np.ndarray):
    """(start, end, value) of each run of equal consecutive values."""
    edges = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(values)]])
    return zip(starts, ends, values[starts])


def generate(cfg: SyntheticConfig, writer: CacheWriter) -> dict:
    """Render every writer into the cache writer, BATCH images at a time."""
    fonts = tuple(available_fonts())
    prototypes = glyph_prototypes(fonts)
    pending: list[tuple[str, dict[str, np.ndarray]]] = []
    pending_images = 0
    label_counts = np.zeros(NUM_CLASSES, np.int64)

    def flush() -> None:
        batch = {key: np.concatenate([s[key] for _, s in pending]) for key in pending[0][1]}
        images = render(prototypes, batch)
        start = 0
        for user, samples in pending:
            count = len(samples["labels"])
            writer.add(user, images[start : start + count], samples["labels"])
            start += count
        pending.clear()

    ids = writer_ids(cfg.num_writers)
    for index in tqdm(range(cfg.num_writers), desc="synthetic writers", disable=None):
        samples = writer_samples(cfg, index, len(fonts))
        label_counts += np.bincount(samples["labels"], minlength=NUM_CLASSES)
        pending.append((ids[index], samples))
        pending_images += len(samples["labels"])
        if pending_images >= BATCH:
            flush()
            pending_images = 0
    if pending:
        flush()
    return {"fonts": list(fonts), "class_counts": label_counts.tolist()}


def synthetic_settings(cfg: SyntheticConfig) -> dict:
    """Everything that determines the generated images (the split settings are not part of it)."""
    keys = (
        "seed",
        "num_writers",
        "images_per_writer_mean",
        "images_per_writer_sd",
        "images_per_writer_min",
        "style_strength",
        "label_skew",
        "sample_jitter",
    )
    return {key: getattr(cfg, key) for key in keys} | {
        "generator_version": GENERATOR_VERSION,
        "fonts": available_fonts(),
        "prototype_size": PROTOTYPE_SIZE,
        "matplotlib": matplotlib_version(),
    }


def synthetic_cache(cfg: SyntheticConfig) -> ImageCache:
    return open_or_build(
        cfg.cache_dir, "synthetic", synthetic_settings(cfg), lambda writer: generate(cfg, writer)
    )
