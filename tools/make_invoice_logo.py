"""Draw the invoice logo (``admin/assets/logo.png``): a brick wall with a coin slot.

Kept so the bundled asset can be redrawn; the invoice renderer only reads the PNG. Drawn at 4x
and scaled down for smooth edges. Run: ``.venv/bin/python tools/make_invoice_logo.py``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
SCALE = 4
NAVY = (23, 43, 77, 255)
TEAL = (45, 178, 160, 255)
MINT = (160, 228, 214, 255)
OUT = Path(__file__).resolve().parent.parent / "admin" / "assets" / "logo.png"


def draw() -> Image.Image:
    """The logo as an RGBA image of SIZE x SIZE pixels."""
    s = SIZE * SCALE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 5, fill=NAVY)
    pad, gap = s * 0.16, s * 0.035
    rows = 4
    row_h = (s - 2 * pad - (rows - 1) * gap) / rows
    width = s - 2 * pad
    for r in range(rows):
        y0 = pad + r * (row_h + gap)
        bricks = [0.5, 1.0, 1.0, 0.5] if r % 2 else [1.0, 1.0, 1.0]
        unit = (width - (len(bricks) - 1) * gap) / sum(bricks)
        x = pad
        for i, b in enumerate(bricks):
            w = unit * b
            colour = TEAL if (r + i) % 3 else MINT
            d.rounded_rectangle((x, y0, x + w, y0 + row_h), radius=s // 64, fill=colour)
            x += w + gap
    # the coin slot: a dark bar across the top row, where money goes into the wall
    slot_w, slot_h = (width - 2 * gap) / 3 * 0.62, row_h * 0.24
    cx, cy = s / 2, pad + row_h / 2
    d.rounded_rectangle((cx - slot_w / 2, cy - slot_h / 2, cx + slot_w / 2, cy + slot_h / 2),
                        radius=slot_h / 2, fill=NAVY)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


if __name__ == "__main__":
    draw().save(OUT, optimize=True)
    print(OUT)
