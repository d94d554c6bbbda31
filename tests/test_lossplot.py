"""The loss curve PNG: decoded pixel by pixel (it is our own stdlib-drawn image, so the test reads its
own format back: 8-bit RGB, filter 0 on every row) to check the curves, axis titles, legend and
the run boundaries of a series."""

from __future__ import annotations

import math
import struct
import zlib

from backprop_mcp import lossplot
from backprop_mcp.lossplot import HEIGHT, WIDTH, render_loss_png, text_width
from engine.contract import grpo_figures

Pixels = list[list[tuple[int, int, int]]]


def decode(png: bytes) -> Pixels:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        tag, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = size
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    rows = []
    for y in range(height):
        row = raw[y * stride : (y + 1) * stride]
        assert row[0] == 0
        rows.append([tuple(row[1 + 3 * x : 4 + 3 * x]) for x in range(width)])
    return rows  # type: ignore[return-value]


def count(pixels: Pixels, color: tuple[int, int, int], box: tuple[int, int, int, int] | None = None) -> int:
    x0, y0, x1, y1 = box or (0, 0, WIDTH, HEIGHT)
    return sum(1 for y in range(y0, y1) for x in range(x0, x1) if pixels[y][x] == color)


def ink(pixels: Pixels, box: tuple[int, int, int, int]) -> int:
    return count(pixels, lossplot._AXIS, box)


def series() -> tuple[list[tuple[float, float]], list[tuple[float, float]], list[float]]:
    train = [(float(s), 3 * math.exp(-(s % 30) / 10) + 0.5) for s in range(1, 91)]
    return train, [(30.0, 1.2), (60.0, 0.9), (90.0, 0.7)], [0.0, 30.0, 60.0]


def test_curves_axis_titles_and_legend() -> None:
    train, eval_points, run_starts = series()
    pixels = decode(render_loss_png(train, eval_points, run_starts))
    assert len(pixels) == HEIGHT and len(pixels[0]) == WIDTH
    plot = (
        lossplot._MARGIN_L + 1,
        lossplot._MARGIN_T,
        WIDTH - lossplot._MARGIN_R,
        HEIGHT - lossplot._MARGIN_B,
    )
    assert count(pixels, lossplot._TRAIN, plot) > 500  # the training curve
    assert count(pixels, lossplot._EVAL, plot) > 100  # the held-out curve
    # "step" under the x axis, centred; "loss" written upwards left of the y axis
    cx = (lossplot._MARGIN_L + WIDTH - lossplot._MARGIN_R) // 2
    assert ink(pixels, (cx - text_width("step"), HEIGHT - 30, cx + text_width("step"), HEIGHT)) > 40
    assert ink(pixels, (0, 100, 30, HEIGHT - 100)) > 40
    # the legend: a swatch of each colour in the top-right corner, with its label beside it
    legend = (WIDTH - 200, lossplot._MARGIN_T + 20, WIDTH - lossplot._MARGIN_R, lossplot._MARGIN_T + 100)
    assert count(pixels, lossplot._TRAIN, legend) >= 26 and count(pixels, lossplot._EVAL, legend) >= 26
    assert count(pixels, lossplot._RUN, legend) > 0 and ink(pixels, legend) > 100


def test_run_boundaries_are_drawn_where_runs_start() -> None:
    train, eval_points, run_starts = series()
    pixels = decode(render_loss_png(train, eval_points, run_starts))
    left, right = lossplot._MARGIN_L, WIDTH - lossplot._MARGIN_R
    columns = [
        x for x in range(left + 2, right) if count(pixels, lossplot._RUN, (x, 100, x + 1, HEIGHT - 100)) > 40
    ]
    expected = [round(left + (right - left) * (s - 1) / (90 - 1)) for s in (30, 60)]
    assert len(columns) == 2 and all(abs(c - e) <= 1 for c, e in zip(columns, expected, strict=True))
    single = decode(render_loss_png(train[:30]))  # one run: no boundary, no run entry in the legend
    assert count(single, lossplot._RUN) == 0


def test_an_empty_job_gets_a_labelled_frame() -> None:
    pixels = decode(render_loss_png([]))
    assert count(pixels, lossplot._TRAIN) == 0
    assert ink(pixels, (0, HEIGHT - 30, WIDTH, HEIGHT)) > 40  # "step" is there already


def test_rewards_get_a_panel_under_the_loss_on_the_same_step_axis() -> None:
    train, eval_points, run_starts = series()
    steps = [p[0] for p in train]
    metrics = {  # a preference method's figures, as trl names them
        "rewards/chosen": [(s, 0.01 * s) for s in steps],
        "rewards/rejected": [(s, -0.02 * s) for s in steps],
        "rewards/accuracies": [(s, 0.9) for s in steps],  # a share: the dashboard's, not drawn here
        "logps/chosen": [(s, -50.0) for s in steps],  # another chart: not drawn here
    }
    png = render_loss_png(train, eval_points, run_starts, metrics)
    pixels = decode(png)
    assert len(pixels) == HEIGHT + lossplot.REWARD_HEIGHT
    loss_panel = (lossplot._MARGIN_L + 1, 0, WIDTH - lossplot._MARGIN_R, HEIGHT - lossplot._MARGIN_B)
    reward_panel = (lossplot._MARGIN_L + 1, HEIGHT, WIDTH - lossplot._MARGIN_R, len(pixels))
    chosen, rejected = lossplot._NAMED["chosen"], lossplot._NAMED["rejected"]
    assert count(pixels, chosen, reward_panel) > 500 and count(pixels, rejected, reward_panel) > 500
    assert count(pixels, chosen, loss_panel) == 0 and count(pixels, lossplot._TRAIN, loss_panel) > 500
    assert ink(pixels, (0, HEIGHT + 60, 30, len(pixels) - 60)) > 40  # "reward" up the left side
    # one step axis: a run starts at the same column in both panels
    left, right = lossplot._MARGIN_L, WIDTH - lossplot._MARGIN_R

    def boundaries(y0: int, y1: int) -> list[int]:
        return [x for x in range(left + 2, right) if count(pixels, lossplot._RUN, (x, y0, x + 1, y1)) > 40]

    assert boundaries(100, HEIGHT - 100) == boundaries(HEIGHT + 60, len(pixels) - 80) != []


def test_grpo_rewards_per_function_and_no_panel_without_rewards() -> None:
    train, _, _ = series()
    steps = [p[0] for p in train]
    metrics = {  # the engine's names for a step with one reward function
        grpo_figures.REWARD: [(s, s / 90) for s in steps],
        grpo_figures.REWARD_STD: [(s, 0.3) for s in steps],
        grpo_figures.reward_mean("format"): [(s, min(1.0, s / 45)) for s in steps],
        grpo_figures.reward_spread("format"): [(s, 0.5 - s / 200) for s in steps],
        grpo_figures.KL: [(s, 0.01) for s in steps],
    }
    assert [line.name for line in lossplot._reward_lines(metrics)] == ["total", "format"]
    pixels = decode(render_loss_png(train, [], [], metrics))
    panel = (lossplot._MARGIN_L + 1, HEIGHT, WIDTH - lossplot._MARGIN_R, len(pixels))
    # the total and the function's mean take the palette's first two colours; the spreads are not drawn
    assert (
        count(pixels, lossplot._PALETTE[0], panel) > 500 and count(pixels, lossplot._PALETTE[1], panel) > 500
    )
    assert count(pixels, lossplot._PALETTE[2], panel) == 0
    assert len(decode(render_loss_png(train, [], [], {"kl": metrics["kl"]}))) == HEIGHT
    assert len(decode(render_loss_png(train, [], [], {}))) == HEIGHT
