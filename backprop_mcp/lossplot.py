"""The loss curve as a PNG, drawn with the standard library only (zlib + struct).

Why not matplotlib: the server draws this live, on every read of ``backprop://jobs/{id}/loss.png``,
and must stay light — matplotlib costs about half a second and tens of MB to import, and the
server never imports the ML stack. A loss curve needs only lines, a grid, a legend and some text,
so this module draws exactly that: the training loss (blue), the held-out loss (orange, when
there is one), the start of each run of a series (grey dashed lines), axis titles ("step",
"loss"), tick values and a legend, in a built-in 5x7 pixel font. When the job's method reports
rewards (``backprop_mcp.figures``: trl's ``rewards/*``, or GRPO's ``reward`` and each function's
``rewards/<function>/mean``), a second panel under the loss draws them on the same step axis; shares
such as the reward accuracy are left to the dashboard, which gives them an axis of their own.

The x axis is the job's global step: a series' runs lie end to end on it.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from backprop_mcp.figures import PRIMARY_GROUPS, grouped, is_share, label_of

Color = tuple[int, int, int]
Points = list[tuple[float, float]]

WIDTH, HEIGHT = 800, 450
REWARD_HEIGHT = 290  # added under the loss for the reward panel, when the method reports rewards
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 104, 20, 20, 64
_WHITE: Color = (255, 255, 255)
_GRID: Color = (225, 225, 225)
_AXIS: Color = (60, 60, 60)
_TRAIN: Color = (31, 119, 180)
_EVAL: Color = (255, 127, 14)
_RUN: Color = (150, 150, 150)
# The reward panel's lines: chosen green and rejected red where a preference method names them,
# the others in turn.
_NAMED: dict[str, Color] = {"chosen": (44, 160, 44), "rejected": (214, 39, 40)}
_PALETTE: tuple[Color, ...] = (_TRAIN, (148, 103, 189), _EVAL, (23, 190, 207), (140, 86, 75), (227, 119, 194))
_SCALE = 2  # each font pixel is 2x2 screen pixels
_ADVANCE = 6 * _SCALE  # 5 pixels of glyph, 1 of space

# 5x7 glyphs: seven rows of five bits (MSB = left pixel). Upper case is drawn as lower case.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    ".": (0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C),
    "-": (0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00),
    "+": (0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00),
    ":": (0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00),
    "/": (0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00),
    "_": (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    " ": (0x00,) * 7,
    "a": (0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F),
    "b": (0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E),
    "c": (0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E),
    "d": (0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F),
    "e": (0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E),
    "f": (0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08),
    "g": (0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E),
    "h": (0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11),
    "i": (0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E),
    "j": (0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C),
    "k": (0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12),
    "l": (0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "m": (0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11),
    "n": (0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11),
    "o": (0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E),
    "p": (0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10),
    "q": (0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01),
    "r": (0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10),
    "s": (0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E),
    "t": (0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06),
    "u": (0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D),
    "v": (0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "w": (0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A),
    "x": (0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11),
    "y": (0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E),
    "z": (0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F),
}


def text_width(text: str) -> int:
    return len(text) * _ADVANCE - _SCALE


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(_WHITE * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def line(
        self, x0: float, y0: float, x1: float, y1: float, color: Color, thick: int = 1, dash: int = 0
    ) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for s in range(steps + 1):
            if dash and (s // dash) % 2:
                continue
            t = s / steps
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(thick):
                for dy in range(thick):
                    self.set(x + dx, y + dy, color)

    def text(self, x: int, y: int, text: str, color: Color, *, vertical: bool = False) -> None:
        """Text with its top-left corner at (x, y); ``vertical`` reads bottom to top, starting at (x, y)."""
        for ch in text:
            for row, bits in enumerate(_FONT.get(ch.lower(), _FONT[" "])):
                for col in range(5):
                    if not bits & (0x10 >> col):
                        continue
                    for dx in range(_SCALE):
                        for dy in range(_SCALE):
                            px, py = col * _SCALE + dx, row * _SCALE + dy
                            if vertical:  # rotated 90 degrees anticlockwise
                                self.set(x + py, y - px, color)
                            else:
                                self.set(x + px, y + py, color)
            if vertical:
                y -= _ADVANCE
            else:
                x += _ADVANCE

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
    if abs(value) >= 10000 or abs(value) < 0.01:
        return f"{value:.1e}".replace("e+0", "e").replace("e-0", "e-")
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


@dataclass
class _Line:
    name: str
    points: Points
    color: Color
    dash: int = 0


@dataclass
class _Panel:
    top: int
    bottom: int
    y_title: str
    lines: list[_Line] = field(default_factory=list)


def render_loss_png(
    train: Points,
    eval_points: Points | None = None,
    run_starts: list[float] | None = None,
    metrics: dict[str, Points] | None = None,
) -> bytes:
    """A PNG of loss against the job's global step. ``run_starts``: the step where each run of a
    series began (the first run's included). ``metrics``: the method's figures by name (trl's); its
    rewards get a panel under the loss. With no points yet, an empty labelled frame."""
    eval_points = eval_points or []
    loss = _Panel(_MARGIN_T, HEIGHT - _MARGIN_B, "loss", [_Line("train", train, _TRAIN)])
    if eval_points:
        loss.lines.append(_Line("eval", eval_points, _EVAL))
    panels = [loss]
    rewards = _reward_lines(metrics or {})
    height = HEIGHT + (REWARD_HEIGHT if rewards else 0)
    if rewards:  # below the loss panel's step labels, down to the image's own bottom margin
        panels.append(_Panel(HEIGHT - _MARGIN_B + 2 * _MARGIN_T, height - _MARGIN_B, "reward", rewards))
    canvas = _Canvas(WIDTH, height)
    points = [p for p in train + eval_points if math.isfinite(p[1])]
    all_x = [p[0] for line in rewards for p in line.points] + [p[0] for p in points]
    x_range = (min(all_x), max(all_x)) if all_x else None
    if x_range and x_range[1] == x_range[0]:
        x_range = (x_range[0], x_range[0] + 1)
    boundaries = [(run, x) for run, x in enumerate(run_starts or [], start=1) if run > 1]
    for panel in panels:
        _draw_panel(canvas, panel, x_range, boundaries)
    canvas.text(
        (_MARGIN_L + WIDTH - _MARGIN_R - text_width("step")) // 2, height - 7 * _SCALE - 8, "step", _AXIS
    )
    return canvas.png()


def _reward_lines(metrics: dict[str, Points]) -> list[_Line]:
    """The reward chart's figures, shares left out, each with its colour (none: no reward chart)."""
    charts = grouped(metrics)
    if not charts or charts[0][0] not in PRIMARY_GROUPS:
        return []
    names = charts[0][1]
    lines, free = [], iter(_PALETTE)
    for name in names:
        points = [p for p in metrics[name] if math.isfinite(p[1])]
        if is_share(name) or not points:
            continue
        label = label_of(name, len(names))
        lines.append(_Line(label, points, _NAMED.get(label) or next(free, _AXIS)))
    return lines


def _draw_panel(
    canvas: _Canvas, panel: _Panel, x_range: tuple[float, float] | None, boundaries: list[tuple[int, float]]
) -> None:
    left, right, top, bottom = _MARGIN_L, WIDTH - _MARGIN_R, panel.top, panel.bottom
    for i in range(5):  # horizontal grid
        y = top + (bottom - top) * i / 4
        canvas.line(left, y, right, y, _GRID)
    canvas.line(left, top, left, bottom, _AXIS)
    canvas.line(left, bottom, right, bottom, _AXIS)
    canvas.text(8, (top + bottom + text_width(panel.y_title)) // 2, panel.y_title, _AXIS, vertical=True)
    ys = [p[1] for line in panel.lines for p in line.points if math.isfinite(p[1])]
    if not ys or x_range is None:
        return
    x_min, x_max = x_range
    y_min, y_max = min(ys), max(ys)
    if y_max == y_min:
        y_min, y_max = y_min - 0.5, y_max + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (right - left) * (x - x_min) / (x_max - x_min),
            bottom - (bottom - top) * (y - y_min) / (y_max - y_min),
        )

    for run, x in boundaries:
        px = to_px(x, y_min)[0]
        canvas.line(px, top, px, bottom, _RUN, dash=4)
        canvas.text(round(px) + 4, top + 4, f"run {run}", _RUN)
    for line in panel.lines:
        finite = [p for p in line.points if math.isfinite(p[1])]
        for (xa, ya), (xb, yb) in zip(finite, finite[1:], strict=False):
            canvas.line(*to_px(xa, ya), *to_px(xb, yb), line.color, thick=2)
        if len(finite) <= 3:  # too few points to see as a line: mark each one
            for p in finite:
                px, py = to_px(*p)
                canvas.line(px - 3, py - 1, px + 3, py - 1, line.color, thick=3)
    _ticks(canvas, panel, x_range, (y_min, y_max), to_px)
    entries = [(line.name, line.color, 0) for line in panel.lines if line.points]
    _legend(canvas, right, top, entries + ([("run start", _RUN, 4)] if boundaries else []))


def _ticks(
    canvas: _Canvas,
    panel: _Panel,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    to_px: Callable[[float, float], tuple[float, float]],
) -> None:
    left, top, bottom = _MARGIN_L, panel.top, panel.bottom
    (x_min, x_max), (y_min, y_max) = x_range, y_range
    for i in range(5):  # tick values on the grid lines
        value = y_max - (y_max - y_min) * i / 4
        y = top + (bottom - top) * i / 4
        label = _label(value)
        canvas.text(left - 8 - text_width(label), round(y) - 7, label, _AXIS)
    for i in range(5):
        value = x_min + (x_max - x_min) * i / 4
        label = _label(round(value) if x_max - x_min >= 8 else value)
        px = round(to_px(value, y_min)[0])
        canvas.line(px, bottom, px, bottom + 4, _AXIS)
        canvas.text(
            min(max(px - text_width(label) // 2, left - 20), WIDTH - text_width(label) - 2),
            bottom + 10,
            label,
            _AXIS,
        )


def _legend(canvas: _Canvas, right: int, top: int, entries: list[tuple[str, Color, int]]) -> None:
    width = 36 + max(text_width(name) for name, _, _ in entries) + 12
    x0, y0 = right - width - 8, top + 28
    for y in range(y0 - 6, y0 + 22 * len(entries) - 2):  # white box so curves don't run through it
        canvas.line(x0 - 6, y, x0 + width, y, _WHITE)
    for k, (name, color, dash) in enumerate(entries):
        y = y0 + 22 * k + 7
        canvas.line(x0, y, x0 + 26, y, color, thick=2 if not dash else 1, dash=dash)
        canvas.text(x0 + 36, y - 7, name, _AXIS)
