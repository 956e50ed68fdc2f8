"""The affinity simulation's plot as a PNG, drawn with numpy and written with zlib (matplotlib is not in the
environment): two panels, adapter loads per request and max/mean requests per replica, against the replica count,
one line per routing policy, with a 5x7 bitmap font for the labels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

WIDTH, HEIGHT, SCALE = 960, 440, 2
COLORS = {"affinity": (31, 119, 180), "round-robin": (214, 39, 40), "power-of-two": (44, 160, 44)}
INK, GRID, WHITE = (30, 30, 30), (225, 225, 225), (255, 255, 255)
GLYPHS = {  # 5 columns x 7 rows, '#' = ink
    "0": " ### #   ##  ### # ###  ##   # ### ", "1": "  #   ##    #    #    #    #   ### ",
    "2": " ### #   #    #   #   #   #   #####", "3": "#####   #   #     #     ##   # ### ",
    "4": "   #   ##  # # #  # #####   #    # ", "5": "######    ####     #    ##   # ### ",
    "6": "  ##  #   #    #### #   ##   # ### ", "7": "#####    #   #   #   #    #    #   ",
    "8": " ### #   ##   # ### #   ##   # ### ", "9": " ### #   ##   # ####    #   #  ##  ",
    "A": " ### #   ##   #######   ##   ##   #", "B": "#### #   ##   ##### #   ##   ##### ",
    "C": " ### #   ##    #    #    #   # ### ", "D": "#### #   ##   ##   ##   ##   ##### ",
    "E": "######    #    #### #    #    #####", "F": "######    #    #### #    #    #    ",
    "G": " ### #   ##    # ####   ##   # ####", "H": "#   ##   ##   #######   ##   ##   #",
    "I": " ###   #    #    #    #    #   ### ", "J": "  ###   #    #    #    # #  #  ##  ",
    "K": "#   ##  # # #  ##   # #  #  # #   #", "L": "#    #    #    #    #    #    #####",
    "M": "#   ### ### # ##   ##   ##   ##   #", "N": "#   ##   ###  ## # ##  ###   ##   #",
    "O": " ### #   ##   ##   ##   ##   # ### ", "P": "#### #   ##   ##### #    #    #    ",
    "Q": " ### #   ##   ##   ## # ##  #  ## #", "R": "#### #   ##   ##### # #  #  # #   #",
    "S": " #####    #     ###     #    ##### ", "T": "#####  #    #    #    #    #    #  ",
    "U": "#   ##   ##   ##   ##   ##   # ### ", "V": "#   ##   ##   ##   ##   # # #   #  ",
    "W": "#   ##   ##   ## # ## # ## # # # # ", "X": "#   ##   # # #   #   # # #   ##   #",
    "Y": "#   ##   # # #   #    #    #    #  ", "Z": "#####    #   #   #   #   #    #####",
    ".": "                         ##   ##   ", "/": "    #    #   #   #   #   #    #    ",
    "-": "                ###                ", "(": "   #   #   #    #    #     #     # ",
    ")": " #     #     #    #    #   #   #   ", ",": "                      ##   ##  #   ",
    ":": "      ##   ##        ##   ##       ", "=": "          #####     #####          ",
    " ": " " * 35,
}


def _glyph(char: str) -> np.ndarray:
    rows = GLYPHS.get(char.upper(), GLYPHS[" "]).ljust(35)[:35]
    return np.array([[c == "#" for c in rows[r * 5:(r + 1) * 5]] for r in range(7)])


def text(image: np.ndarray, x: int, y: int, value: str, color: tuple[int, int, int] = INK,
         vertical: bool = False) -> None:
    """Draws `value` with its top-left corner at (x, y); vertical text reads bottom to top."""
    for i, char in enumerate(value):
        mask = np.kron(_glyph(char), np.ones((SCALE, SCALE), dtype=bool))
        if vertical:
            mask = np.rot90(mask)
            top, left = y - (i + 1) * 6 * SCALE, x
        else:
            top, left = y, x + i * 6 * SCALE
        region = image[top:top + mask.shape[0], left:left + mask.shape[1]]
        region[mask[:region.shape[0], :region.shape[1]]] = color


def line(image: np.ndarray, a: tuple[float, float], b: tuple[float, float], color: tuple[int, int, int],
         width: int = 2, dashed: bool = False) -> None:
    steps = int(max(abs(b[0] - a[0]), abs(b[1] - a[1]))) + 1
    for step, t in enumerate(np.linspace(0.0, 1.0, steps)):
        if dashed and (step // 10) % 2:
            continue
        x, y = int(a[0] + t * (b[0] - a[0])), int(a[1] + t * (b[1] - a[1]))
        image[y - width // 2:y + width - width // 2, x - width // 2:x + width - width // 2] = color


def panel(image: np.ndarray, box: tuple[int, int, int, int], rows: list[dict[str, Any]], key: str,
          title: str, ticks: list[float]) -> None:
    """Lines per policy over the replica counts (evenly spaced) in box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    low, high = ticks[0], ticks[-1]
    counts = sorted({row["replicas"] for row in rows})
    xs = {n: left + (i + 0.5) * (right - left) / len(counts) for i, n in enumerate(counts)}

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    for tick in ticks:
        line(image, (left, y_of(tick)), (right, y_of(tick)), GRID, 1)
        label = f"{tick:.2f}"
        text(image, left - len(label) * 6 * SCALE - 8, int(y_of(tick)) - 7, label)
    line(image, (left, top), (left, bottom), INK)
    line(image, (left, bottom), (right, bottom), INK)
    for n, x in xs.items():
        text(image, int(x) - len(str(n)) * 3 * SCALE, bottom + 10, str(n))
    text(image, (left + right) // 2 - 8 * 6, bottom + 34, "REPLICAS")
    text(image, left, top - 30, title)
    for policy, color in COLORS.items():
        points = [(xs[r["replicas"]], y_of(r[key])) for r in sorted(rows, key=lambda r: r["replicas"])
                  if r["policy"] == policy]
        for a, b in zip(points, points[1:], strict=False):
            line(image, a, b, color, 3, dashed=policy == "power-of-two")  # it often lies on round-robin
        for x, y in points:
            image[int(y) - 5:int(y) + 5, int(x) - 5:int(x) + 5] = color


def png(image: np.ndarray) -> bytes:
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].astype(np.uint8).tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def plot(rows: list[dict[str, Any]], config: Any, path: str | Path) -> None:
    image = np.full((HEIGHT, WIDTH, 3), WHITE, dtype=np.uint8)
    caption = f"{config.adapters} ADAPTERS, ZIPF {config.zipf}, {config.slots} SLOTS PER REPLICA"
    text(image, 20, 12, caption)
    load_top = max(0.8, max(row["load_rate"] for row in rows))
    panel(image, (110, 90, 450, 350), rows, "load_rate", "ADAPTER LOADS PER REQUEST",
          [round(load_top * i / 4, 2) for i in range(5)])
    top = max(1.2, max(row["balance"] for row in rows))
    panel(image, (590, 90, 930, 350), rows, "balance", "MAX/MEAN REQUESTS PER REPLICA",
          [round(1.0 + (top - 1.0) * i / 4, 2) for i in range(5)])
    x = 110
    for policy, color in COLORS.items():
        label = {"affinity": "AFFINITY (RAY)"}.get(policy, policy.upper())
        image[408:420, x:x + 12] = color
        text(image, x + 20, 407, label)
        x += 20 + len(label) * 6 * SCALE + 40
    Path(path).write_bytes(png(image))
