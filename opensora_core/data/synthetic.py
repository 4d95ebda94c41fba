"""MovingShapes: a deterministic synthetic text-to-video data set with known ground truth.

Each sample is one saturated shape (circle, square, triangle) of one colour that moves left,
right, up, down or stays still over a dark, muted background (plain or a vertical gradient).
Clips have 4k+1 frames and are written as h264 mp4; one-frame stills are written as PNG.
Captions name the colour, the shape, the motion (clips) and the background in varied sentences.

Every decision is drawn up front by :func:`plan_samples` from the seed, so rendering is a pure
function of a :class:`ShapeSample` and the same seed renders the same frames. Whole
(shape, colour, motion) combinations are held out as ``val`` (:func:`held_out_combos`), so
evaluation measures compositional generalisation, not memorisation; ``ingest.val_pairs`` holds out
a colour or a motion together with a shape under every other word (:func:`pair_combos`).

Evaluation imports the tables (:data:`SHAPES`, :data:`COLORS`, :data:`MOTIONS`,
:data:`BACKGROUNDS`) and the pixel measurements (:func:`foreground_mask`,
:func:`dominant_color`, :func:`centroid_track`): shapes are bright (max channel >= 200),
backgrounds dark (max channel <= 80), so a brightness threshold separates them.
This module imports neither torch nor anything heavy.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opensora_core.config import IngestConfig
from opensora_core.data.video_io import write_image, write_video
from opensora_core.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Tables (imported by evaluation)
# --------------------------------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape names, as they appear in captions and labels."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (240, 220, 30),
    "green": (40, 200, 60),
    "cyan": (30, 210, 230),
    "blue": (50, 90, 250),
    "magenta": (220, 50, 220),
}
"""Shape colours, name -> RGB: six hues 60 degrees apart, saturated and bright."""

MOTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
    "static": (0, 0),
}
"""Motion name -> unit direction ``(dy, dx)`` in image coordinates (y grows downwards)."""

BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "black": ((12, 12, 12), (12, 12, 12)),
    "dark gray": ((52, 52, 52), (52, 52, 52)),
    "dark blue": ((18, 24, 66), (18, 24, 66)),
    "dark green": ((16, 50, 28), (16, 50, 28)),
    "gray gradient": ((72, 72, 72), (10, 10, 10)),
    "blue gradient": ((34, 44, 80), (6, 8, 22)),
}
"""Background name -> (top RGB, bottom RGB); plain backgrounds have both equal."""

FOREGROUND_MIN_VALUE = 128
"""A pixel whose brightest channel reaches this is foreground (shape), otherwise background."""

SIZE_RANGE = (0.12, 0.2)
"""Shape radius as a share of the frame's shorter side, drawn uniformly."""
TRAVEL_RANGE = (0.5, 0.9)
"""Share of the free travel along the motion axis that a moving shape covers over the clip."""
MARGIN = 1.0
"""Pixels kept between the shape's bounding box and the frame edge."""
STATIC_SHARE = 0.1
"""Evaluation calls a clip ``static`` when its fitted travel is under this share of the frame's
shorter side: a moving shape travels at least a fifth of its axis, and a generated still shape
wobbles by a few pixels."""

# Motion phrases in the third person, each naming its direction (or stillness) in plain words.
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": (
        "drifts to the left",
        "moves left",
        "slides to the left",
        "glides leftward",
        "travels to the left",
    ),
    "right": (
        "drifts to the right",
        "moves right",
        "slides to the right",
        "glides rightward",
        "travels to the right",
    ),
    "up": ("rises upward", "moves up", "floats up", "drifts upward", "climbs up"),
    "down": ("falls downward", "moves down", "sinks down", "drifts downward", "slides down"),
    "static": ("stays still", "sits motionless", "rests in place", "remains still", "does not move"),
}
CLIP_TEMPLATES: tuple[str, ...] = (
    "{obj} {motion} on {bg} background",
    "{obj} {motion} against {bg} background",
    "{bg} background with {obj} that {motion}",
    "on {bg} background, {obj} {motion}",
    "a video of {obj} that {motion} over {bg} background",
    "{obj} {motion}, shown on {bg} background",
)
STILL_TEMPLATES: tuple[str, ...] = (
    "{obj} on {bg} background",
    "a picture of {obj} on {bg} background",
    "an image of {obj} against {bg} background",
    "a still image of {obj} over {bg} background",
    "{bg} background with {obj}",
)

Combo = tuple[str, str, str]
"""(shape, colour, motion)."""

LABEL_COLUMNS: tuple[str, ...] = (
    "path",
    "text",
    "split",
    "kind",
    "shape",
    "color",
    "color_rgb",
    "motion",
    "direction_y",
    "direction_x",
    "background",
    "size",
    "start_y",
    "start_x",
    "speed",
    "num_frames",
    "height",
    "width",
    "fps",
)
"""Columns of ``labels.parquet``, in order (see :meth:`ShapeSample.label_row`)."""


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeSample:
    """Ground truth of one clip or still; :func:`render` turns it into frames."""

    name: str
    """File stem, e.g. ``clip_0007``."""
    kind: str
    """``clip`` (mp4) or ``still`` (PNG, one frame)."""
    shape: str
    color: str
    motion: str
    background: str
    height: int
    width: int
    num_frames: int
    fps: float
    """Frames per second; 0 for stills."""
    size: float
    """Radius in pixels: the shape fits in a ``2 * size`` square around its centre."""
    start_y: float
    """Centre row at frame 0 (pixel-centre coordinates, 0 = first row)."""
    start_x: float
    """Centre column at frame 0."""
    speed: float
    """Pixels per frame along the motion's unit direction (0 for ``static``)."""
    split: str
    text: str

    @property
    def rel_path(self) -> str:
        """Path relative to the output folder: ``clips/NAME.mp4`` or ``stills/NAME.png``."""
        return f"clips/{self.name}.mp4" if self.kind == "clip" else f"stills/{self.name}.png"

    @property
    def combo(self) -> Combo:
        return (self.shape, self.color, self.motion)

    def centers(self) -> np.ndarray:
        """Centre of the shape per frame, ``(T, 2)`` float ``(y, x)``."""
        dy, dx = MOTIONS[self.motion]
        t = np.arange(self.num_frames, dtype=np.float64)
        return np.stack([self.start_y + t * self.speed * dy, self.start_x + t * self.speed * dx], axis=1)

    def label_row(self) -> dict[str, Any]:
        """One row of ``labels.parquet`` (``path`` relative to the output folder).

        ``color_rgb`` is the colour's RGB triple, ``direction_y``/``direction_x`` the unit
        direction of the motion; the other columns are this sample's fields.
        """
        row = asdict(self)
        row["path"] = self.rel_path
        row["color_rgb"] = list(COLORS[self.color])
        row["direction_y"], row["direction_x"] = MOTIONS[self.motion]
        return {column: row[column] for column in LABEL_COLUMNS}


def all_combos() -> list[Combo]:
    """Every (shape, colour, motion) combination, in table order."""
    return list(itertools.product(SHAPES, COLORS, MOTIONS))


def held_out_combos(val_combos: int, seed: int, val_pairs: list[str] | tuple[str, ...] = ()) -> list[Combo]:
    """The combinations held out as ``val``, in table order: ``val_combos`` chosen from the seed
    alone, and every combination of each ``"WORD SHAPE"`` pair (:func:`pair_combos`)."""
    combos = all_combos()
    if not 0 <= val_combos < len(combos):
        raise ConfigError(f"ingest.val_combos must be in [0, {len(combos)}), got {val_combos}")
    rng = np.random.default_rng([seed, 0])
    picked = set(rng.choice(len(combos), size=val_combos, replace=False).tolist())
    held = {c for pair in val_pairs for c in pair_combos(pair)}
    out = [c for i, c in enumerate(combos) if i in picked or c in held]
    if len(out) >= len(combos):
        raise ConfigError(f"ingest.val_combos and ingest.val_pairs hold out every combination: {val_pairs}")
    return out


def pair_combos(pair: str) -> list[Combo]:
    """Every (shape, colour, motion) holding both words of ``"WORD SHAPE"`` (WORD a colour or a
    motion); ConfigError naming ``ingest.val_pairs`` for words outside the tables."""
    word, _, shape = pair.strip().partition(" ")
    shape = shape.strip()
    if shape not in SHAPES or not (word in COLORS or word in MOTIONS):
        raise ConfigError(
            f"ingest.val_pairs: {pair!r} is not 'WORD SHAPE' with WORD a colour ({', '.join(COLORS)}) "
            f"or a motion ({', '.join(MOTIONS)}) and SHAPE one of {', '.join(SHAPES)}"
        )
    return [c for c in all_combos() if c[0] == shape and word in (c[1], c[2])]


def clips_per_val_combo(num_clips: int, val_combos: int) -> int:
    """Clips drawn for each held-out combination: about the share of a random draw, at least 2,
    and never more than half of all clips in ``val`` together."""
    if val_combos == 0 or num_clips == 0:
        return 0
    if num_clips < 2 * val_combos:
        raise ConfigError(
            f"ingest.num_clips={num_clips} is too small for {val_combos} held-out combinations "
            "(ingest.val_combos and ingest.val_pairs): "
            f"need at least {2 * val_combos} clips (every held-out combination gets clips, "
            "and val stays at most half)"
        )
    share = max(2, round(num_clips / len(all_combos())))
    return max(1, min(share, num_clips // (2 * val_combos)))


def plan_samples(cfg: IngestConfig) -> list[ShapeSample]:
    """Draw every clip and still of the data set from ``cfg.seed``: clips first, then stills.

    Held-out combinations get :func:`clips_per_val_combo` clips each; the other clips cycle
    through the training combinations in shuffled rounds, so each appears before any repeats.
    A still is ``val`` when its (shape, colour, ``static``) combination is held out.
    """
    val = held_out_combos(cfg.val_combos, cfg.seed, cfg.val_pairs)
    val_set = set(val)
    train = [c for c in all_combos() if c not in val_set]
    rng = np.random.default_rng([cfg.seed, 1])

    # 1. Combinations of the clips: the held-out ones, then shuffled rounds of the others.
    per_val = clips_per_val_combo(cfg.num_clips, len(val))
    clip_combos = [c for c in val for _ in range(per_val)]
    while len(clip_combos) < cfg.num_clips:
        need = cfg.num_clips - len(clip_combos)
        clip_combos += [train[i] for i in rng.permutation(len(train))[:need]]
    clip_combos = [clip_combos[i] for i in rng.permutation(len(clip_combos))]

    # 2. Every clip's size, timing, background, trajectory and caption.
    samples = []
    for i, (shape, color, motion) in enumerate(clip_combos):
        split = "val" if (shape, color, motion) in val_set else "train"
        samples.append(_draw_sample(rng, cfg, f"clip_{i:04d}", "clip", shape, color, motion, split))

    # 3. Stills: a random shape and colour, static, split by their combination.
    for i in range(cfg.num_stills):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        split = "val" if (shape, color, "static") in val_set else "train"
        samples.append(_draw_sample(rng, cfg, f"still_{i:04d}", "still", shape, color, "static", split))
    return samples


def _draw_sample(
    rng: np.random.Generator,
    cfg: IngestConfig,
    name: str,
    kind: str,
    shape: str,
    color: str,
    motion: str,
    split: str,
) -> ShapeSample:
    height, width = cfg.sizes[rng.integers(len(cfg.sizes))]
    if kind == "clip":
        num_frames = int(cfg.num_frames[rng.integers(len(cfg.num_frames))])
        fps = float(cfg.fps[rng.integers(len(cfg.fps))])
    else:
        num_frames, fps = 1, 0.0
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size_frac = rng.uniform(*SIZE_RANGE)
    size = size_frac * min(height, width)

    # The centre stays in [lo, hi] on both axes, so the whole shape stays inside the frame.
    lo = size + MARGIN
    hi_y, hi_x = height - 1 - lo, width - 1 - lo
    start_y, start_x = rng.uniform(lo, hi_y), rng.uniform(lo, hi_x)
    dy, dx = MOTIONS[motion]
    speed = 0.0
    if (dy or dx) and num_frames > 1:
        hi = hi_y if dy else hi_x
        travel = rng.uniform(*TRAVEL_RANGE) * (hi - lo)
        start = rng.uniform(lo, hi - travel) if (dy + dx) > 0 else rng.uniform(lo + travel, hi)
        if dy:
            start_y = start
        else:
            start_x = start
        speed = travel / (num_frames - 1)

    size_word = "small " if size_frac < 0.14 else "large " if size_frac > 0.18 else ""
    text = make_caption(rng, kind, shape, color, motion, background, size_word)
    return ShapeSample(
        name=name,
        kind=kind,
        shape=shape,
        color=color,
        motion=motion,
        background=background,
        height=int(height),
        width=int(width),
        num_frames=num_frames,
        fps=fps,
        size=round(float(size), 4),
        start_y=round(float(start_y), 4),
        start_x=round(float(start_x), 4),
        speed=round(float(speed), 6),
        split=split,
        text=text,
    )


def make_caption(
    rng: np.random.Generator,
    kind: str,
    shape: str,
    color: str,
    motion: str,
    background: str,
    size_word: str = "",
) -> str:
    """A natural sentence naming colour, shape, background and (for clips) the motion."""
    obj = _with_article(f"{size_word}{color} {shape}")
    bg = _with_article(background)
    if kind == "still":
        template = STILL_TEMPLATES[rng.integers(len(STILL_TEMPLATES))]
        return template.format(obj=obj, bg=bg)
    phrases = MOTION_PHRASES[motion]
    template = CLIP_TEMPLATES[rng.integers(len(CLIP_TEMPLATES))]
    return template.format(obj=obj, bg=bg, motion=phrases[rng.integers(len(phrases))])


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
# Convex outlines in units of the radius, (y, x) with y downwards: each fits in [-1, 1]^2.
_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-0.85, -0.85], [-0.85, 0.85], [0.85, 0.85], [0.85, -0.85]]),
    "triangle": np.array([[-1.0, 0.0], [0.8, 1.0], [0.8, -1.0]]),
}


def render(sample: ShapeSample) -> np.ndarray:
    """Frames of one sample, ``(T, H, W, 3)`` uint8; edges are anti-aliased by pixel coverage."""
    h, w = sample.height, sample.width
    background = render_background(sample.background, h, w)  # (H, W, 3)
    centers = sample.centers()  # (T, 2)
    yy = np.arange(h, dtype=np.float64)[None, :, None] - centers[:, 0, None, None]  # (T, H, 1)
    xx = np.arange(w, dtype=np.float64)[None, None, :] - centers[:, 1, None, None]  # (T, 1, W)
    alpha = shape_coverage(sample.shape, yy, xx, sample.size)[..., None]  # (T, H, W, 1)
    color = np.asarray(COLORS[sample.color], dtype=np.float64)
    frames = background[None] * (1.0 - alpha) + color * alpha
    return np.round(frames).astype(np.uint8)


def render_background(name: str, height: int, width: int) -> np.ndarray:
    """A plain or vertical-gradient background, ``(H, W, 3)`` float64 in [0, 255]."""
    top, bottom = (np.asarray(c, dtype=np.float64) for c in BACKGROUNDS[name])
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    return np.broadcast_to(top * (1.0 - ramp) + bottom * ramp, (height, width, 3)).copy()


def shape_coverage(shape: str, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    """Share of each pixel the shape covers, in [0, 1], as :func:`render` draws it; ``yy``/``xx``
    are the pixels' offsets from the shape's centre (broadcast together)."""
    return np.clip(_signed_distance(shape, yy, xx, radius) + 0.5, 0.0, 1.0)


def shape_area(shape: str) -> float:
    """Area of the shape at radius 1 (pixels at radius r: ``shape_area * r**2``)."""
    if shape == "circle":
        return math.pi
    pts = _POLYGONS[shape]
    y, x = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def shape_centroid(shape: str) -> np.ndarray:
    """Offset ``(dy, dx)`` of the shape's area centroid from its centre at radius 1 (a triangle's
    centroid sits below its centre: the apex points up)."""
    if shape == "circle":
        return np.zeros(2)
    return _POLYGONS[shape].mean(axis=0)  # the vertex mean: the area centroid of a triangle or a square


def _signed_distance(shape: str, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    """Approximate distance in pixels to the shape's outline, positive inside."""
    if shape == "circle":
        return radius - np.sqrt(yy**2 + xx**2)
    pts = _POLYGONS[shape] * radius
    centroid = pts.mean(axis=0)
    dist = None
    for a, b in zip(pts, np.roll(pts, -1, axis=0)):
        normal = np.array([-(b[1] - a[1]), b[0] - a[0]])
        normal /= np.linalg.norm(normal)
        if normal @ (centroid - a) < 0:  # point the normal inwards
            normal = -normal
        d = normal[0] * (yy - a[0]) + normal[1] * (xx - a[1])
        dist = d if dist is None else np.minimum(dist, d)
    return dist


def write_sample(sample: ShapeSample, out_dir: Path) -> Path:
    """Render ``sample`` and write it under ``out_dir`` at :attr:`ShapeSample.rel_path`."""
    frames = render(sample)
    path = Path(out_dir) / sample.rel_path
    if sample.kind == "clip":
        return write_video(path, frames, sample.fps)
    return write_image(path, frames[0])


# --------------------------------------------------------------------------------------------
# Pixel measurements (evaluation)
# --------------------------------------------------------------------------------------------
def foreground_mask(frames: np.ndarray) -> np.ndarray:
    """Shape pixels of ``(..., H, W, 3)`` uint8 frames: a bool mask ``(..., H, W)``."""
    return np.asarray(frames).max(axis=-1) >= FOREGROUND_MIN_VALUE


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index into ``list(COLORS)`` of the nearest colour for each ``(..., 3)`` RGB value."""
    table = np.asarray(list(COLORS.values()), dtype=np.float64)  # (C, 3)
    diff = np.asarray(rgb, dtype=np.float64)[..., None, :] - table
    return np.argmin((diff**2).sum(axis=-1), axis=-1)


def dominant_color(frames: np.ndarray) -> str | None:
    """The colour name most foreground pixels of ``(..., H, W, 3)`` frames are nearest to.

    ``None`` when no pixel is foreground.
    """
    frames = np.asarray(frames)
    pixels = frames[foreground_mask(frames)]  # (N, 3)
    if len(pixels) == 0:
        return None
    votes = Counter(nearest_color(pixels).tolist())
    return list(COLORS)[votes.most_common(1)[0][0]]


def centroid_track(frames: np.ndarray) -> np.ndarray:
    """Foreground centroid per frame of ``(T, H, W, 3)`` frames: ``(T, 2)`` float ``(y, x)``.

    Rows are NaN where a frame has no foreground pixel.
    """
    mask = foreground_mask(frames)  # (T, H, W)
    track = np.full((mask.shape[0], 2), np.nan)
    for t, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(ys):
            track[t] = ys.mean(), xs.mean()
    return track


def track_travel(track: np.ndarray) -> np.ndarray:
    """Travel ``(dy, dx)`` over the clip of the least-squares line through a ``(T, 2)`` track.

    The fit uses every frame with foreground (NaN rows are skipped), so one stray frame at either
    end moves it little; zeros when fewer than two frames have foreground.
    """
    track = np.asarray(track, dtype=np.float64)
    rows = ~np.isnan(track).any(axis=1)
    if rows.sum() < 2:
        return np.zeros(2)
    slope = np.polyfit(np.nonzero(rows)[0].astype(np.float64), track[rows], 1)[0]  # (2,) per frame
    return slope * (len(track) - 1)


def motion_of_track(track: np.ndarray, min_displacement: float = 2.0) -> str:
    """The name in :data:`MOTIONS` that best fits a ``(T, 2)`` centroid track.

    ``static`` when the fitted travel (:func:`track_travel`) is under ``min_displacement``
    pixels; otherwise the direction with the largest projection of the travel.
    """
    travel = track_travel(track)
    if math.hypot(*travel) < min_displacement:
        return "static"
    moving = {k: v for k, v in MOTIONS.items() if v != (0, 0)}
    return max(moving, key=lambda k: moving[k][0] * travel[0] + moving[k][1] * travel[1])
