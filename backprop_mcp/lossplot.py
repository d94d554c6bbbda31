"""The loss curve as a small PNG, drawn with the standard library only (zlib + struct).

Why not matplotlib: it is not a dependency of the server (only of the ``train`` extra), it costs
about half a second and tens of MB to import, and a loss curve needs nothing but lines, a grid
and a few numbers. This module draws exactly that: training loss (blue), evaluation loss
(orange, when present), axes with min/max labels in a built-in 3x5 pixel font.
"""

from __future__ import annotations

import math
import struct
import zlib

WIDTH, HEIGHT = 640, 360
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 56, 16, 16, 28
_WHITE = (255, 255, 255)
_GRID = (225, 225, 225)
_AXIS = (60, 60, 60)
_TRAIN = (31, 119, 180)
_EVAL = (255, 127, 14)

# 3x5 glyphs, one row per 3-bit number (MSB = left pixel).
_FONT = {
    "0": (7, 5, 5, 5, 7),
    "1": (2, 6, 2, 2, 7),
    "2": (7, 1, 7, 4, 7),
    "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7),
    "6": (7, 4, 7, 5, 7),
    "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7),
    "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2),
    "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7),
    " ": (0, 0, 0, 0, 0),
}
_SCALE = 2  # each font pixel is 2x2 screen pixels


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(_WHITE * (width * height))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def line(
        self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int], thick: int = 1
    ) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for s in range(steps + 1):
            t = s / steps
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(thick):
                for dy in range(thick):
                    self.set(x + dx, y + dy, color)

    def text(self, x: int, y: int, text: str, color: tuple[int, int, int]) -> None:
        for ch in text:
            for row, bits in enumerate(_FONT.get(ch, _FONT[" "])):
                for col in range(3):
                    if bits & (4 >> col):
                        for dx in range(_SCALE):
                            for dy in range(_SCALE):
                                self.set(x + col * _SCALE + dx, y + row * _SCALE + dy, color)
            x += 4 * _SCALE

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(tag: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + tag
                + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
            )

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b"")
        )


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.3g}"


def render_loss_png(
    train: list[tuple[float, float]], eval_points: list[tuple[float, float]] | None = None
) -> bytes:
    """A PNG of loss against step. With no points yet, an empty frame (the job has not logged a step)."""
    canvas = _Canvas(WIDTH, HEIGHT)
    left, right, top, bottom = _MARGIN_L, WIDTH - _MARGIN_R, _MARGIN_T, HEIGHT - _MARGIN_B
    points = [p for p in train + (eval_points or []) if math.isfinite(p[1])]
    for i in range(5):  # horizontal grid
        y = top + (bottom - top) * i / 4
        canvas.line(left, y, right, y, _GRID)
    canvas.line(left, top, left, bottom, _AXIS)
    canvas.line(left, bottom, right, bottom, _AXIS)
    if not points:
        return canvas.png()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = min(ys), max(ys)
    if x_max == x_min:
        x_max = x_min + 1
    if y_max == y_min:
        y_min, y_max = y_min - 0.5, y_max + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (right - left) * (x - x_min) / (x_max - x_min),
            bottom - (bottom - top) * (y - y_min) / (y_max - y_min),
        )

    for series, color in ((train, _TRAIN), (eval_points or [], _EVAL)):
        finite = [p for p in series if math.isfinite(p[1])]
        for (xa, ya), (xb, yb) in zip(finite, finite[1:], strict=False):
            canvas.line(*to_px(xa, ya), *to_px(xb, yb), color, thick=2)
        if len(finite) == 1:
            px, py = to_px(*finite[0])
            canvas.line(px - 2, py, px + 2, py, color, thick=3)
    canvas.text(4, top, _label(y_max), _AXIS)
    canvas.text(4, bottom - 10, _label(y_min), _AXIS)
    canvas.text(left, bottom + 8, _label(x_min), _AXIS)
    end_label = _label(x_max)
    canvas.text(right - len(end_label) * 4 * _SCALE, bottom + 8, end_label, _AXIS)
    return canvas.png()
