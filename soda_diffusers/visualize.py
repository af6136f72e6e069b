"""Pictures of results: image grids (PNG), orbits (GIF), curves and bar charts (PNG)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch


def to_pil(images: torch.Tensor | np.ndarray | Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
    """``(N, 3, H, W)`` tensors in [-1, 1], ``(N, H, W, 3)`` arrays in [0, 1] or PIL images -> PIL images."""
    if isinstance(images, torch.Tensor):
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        # Clip before rounding: values outside [0, 1] would wrap around in uint8.
        return [PIL.Image.fromarray(np.round(np.clip(i, 0, 1) * 255).astype(np.uint8)) for i in images]
    return list(images)


def make_grid(images, columns: int = 8, scale: int = 1, padding: int = 1) -> PIL.Image.Image:
    """Tile images row by row on a white background, each enlarged ``scale`` times (nearest)."""
    tiles = [image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST) for image in to_pil(images)]
    width, height = tiles[0].size
    rows = -(-len(tiles) // columns)
    columns = min(columns, len(tiles))
    grid = PIL.Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for i, tile in enumerate(tiles):
        row, column = divmod(i, columns)
        grid.paste(tile, (padding + column * (width + padding), padding + row * (height + padding)))
    return grid


def save_gif(images, path: str | Path, scale: int = 4, duration_ms: int = 120) -> Path:
    """An orbit as a looping GIF."""
    frames = [image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST) for image in to_pil(images)]
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path


def draw_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
                size: tuple[int, int] = (640, 400), log_y: bool = True,
                x_label: Callable[[float], str] = "{:.0f}".format) -> PIL.Image.Image:
    """Line plot of named ``(x, y)`` curves, drawn with PIL alone (no plotting library). ``x_label``
    writes the value at each x tick (it may return two lines, e.g. minutes over steps)."""
    from PIL import ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    width, height = size
    left, right, top, bottom = 70, 20, 30, 48
    image = PIL.Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    transform = (lambda v: np.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xs = [x for xs_, _ in curves.values() for x in xs_]
    ys = [transform(y) for _, ys_ in curves.values() for y in ys_]
    if not xs:
        raise ValueError("draw_curves: nothing to plot")
    x_min, x_max = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_min, y_max = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def point(x, y):
        px = left + (x - x_min) / (x_max - x_min) * (width - left - right)
        py = top + (1 - (transform(y) - y_min) / (y_max - y_min)) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0.0, 0.5, 1.0):
        y_value = y_min + fraction * (y_max - y_min)
        label = f"{10**y_value:.3g}" if log_y else f"{y_value:.3g}"
        py = top + (1 - fraction) * (height - top - bottom)
        draw.text((5, py - 6), label, fill="black")
        x_value = x_min + fraction * (x_max - x_min)
        label = x_label(x_value)
        label_width = max(draw.textlength(line) for line in label.split("\n"))
        draw.text((left + fraction * (width - left - right - label_width), height - bottom + 6), label, fill="black")
    draw.text((left, 8), title, fill="black")
    for i, (name, (x_values, y_values)) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        points = [point(x, y) for x, y in zip(x_values, y_values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points if len(points) < 30 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right - 150, top + 8 + 14 * i), name, fill=colour)
    return image


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = "",
                size: tuple[int, int] = (640, 400), log_y: bool = True) -> Path:
    """:func:`draw_curves`, saved as a PNG."""
    path = Path(path)
    draw_curves(curves, title, size, log_y).save(path)
    return path


# The panels of a learning curve: (metric key of the training log, title).
LEARNING_CURVE_METRICS = (
    ("psnr", "PSNR (dB), higher is better"),
    ("ssim", "SSIM, higher is better"),
    ("fg_iou", "FG IoU, higher is better"),
    ("fg_color_error", "FG colour error (0-255), lower is better"),
    ("fg_brightness_error", "its brightness part, lower is better"),
    ("fg_chroma_error", "its chroma part, lower is better"),
)


def plot_learning_curve(log: Sequence[dict], path: str | Path, columns: int = 2) -> Path:
    """The quality logged during training (``train_log.jsonl`` rows with ``val_<metric>`` for the samples,
    ``val_one_step_<metric>`` for the one-step estimate and ``val_copy_source_<metric>`` for the baseline)
    as one PNG: a panel per metric of :data:`LEARNING_CURVE_METRICS` against minutes of training (steps
    beneath)."""
    rows = [row for row in log if "val_psnr" in row]
    if not rows:
        raise ValueError("plot_learning_curve: no validation rows (val_psnr) in the log")
    minutes = [row["elapsed_s"] / 60 for row in rows]
    steps = [row["step"] for row in rows]

    def x_label(value: float) -> str:
        return f"{value:.1f} min\n{round(np.interp(value, minutes, steps))} steps"

    panels = []
    for key, title in LEARNING_CURVE_METRICS:
        curves = {"samples": (minutes, [row[f"val_{key}"] for row in rows])}
        if f"val_one_step_{key}" in rows[0]:
            curves["one-step estimate"] = (minutes, [row[f"val_one_step_{key}"] for row in rows])
        if f"val_copy_source_{key}" in rows[0]:
            curves["copy the source"] = ([minutes[0], minutes[-1]], [rows[0][f"val_copy_source_{key}"]] * 2)
        panels.append(draw_curves(curves, title, size=(480, 300), log_y=False, x_label=x_label))
    width, height = panels[0].size
    sheet = PIL.Image.new("RGB", (width * columns, height * -(-len(panels) // columns)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * width, (i // columns) * height))
    path = Path(path)
    sheet.save(path)
    return path


def plot_bars(values: dict[str, float], path: str | Path, title: str = "", height: int = 400,
              value_format: str = "{:.3g}") -> Path:
    """Bar chart of named values as a PNG, drawn with PIL alone: one bar per name, its value above it.

    The y axis starts at 0 (or at the lowest value, when some are negative); the image widens with the
    number and length of the names so that labels do not overlap."""
    from PIL import ImageDraw

    if not values:
        raise ValueError("plot_bars: nothing to plot")
    colour = (31, 119, 180)
    left, right, top, bottom = 60, 20, 40, 40
    draw = ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    slot = max(48, 12 + max(int(draw.textlength(name)) for name in values))
    width = max(320, left + right + slot * len(values))
    image = PIL.Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y_min, y_max = min(0.0, *values.values()), max(0.0, *values.values())
    if y_max == y_min:
        y_max = y_min + 1

    def y_pixel(value: float) -> float:
        return top + (1 - (value - y_min) / (y_max - y_min)) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0.0, 0.5, 1.0):
        y_value = y_min + fraction * (y_max - y_min)
        draw.text((5, y_pixel(y_value) - 6), f"{y_value:.3g}", fill="black")
    draw.text((left, 12), title, fill="black")
    plot_width = width - left - right
    for i, (name, value) in enumerate(values.items()):
        centre = left + plot_width * (i + 0.5) / len(values)
        half = 0.35 * plot_width / len(values)
        top_y, base_y = sorted((y_pixel(value), y_pixel(0.0)))
        draw.rectangle([centre - half, top_y, centre + half, base_y], fill=colour)
        label = value_format.format(value)
        label_y = top_y - 14 if value >= 0 else base_y + 2
        draw.text((centre - draw.textlength(label) / 2, label_y), label, fill="black")
        draw.text((centre - draw.textlength(name) / 2, height - bottom + 8), name, fill="black")
    path = Path(path)
    image.save(path)
    return path
