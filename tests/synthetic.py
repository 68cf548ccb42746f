"""Real image files that a network can learn: each class is a colour and a shape.

Written as actual JPEG/PNG files through PIL, so every test that reads them goes through the
same decode path as the real data set.
"""

from __future__ import annotations

import io
import lzma
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

# A few real class names from the fixed list; labels come from their index in CLASS_NAMES.
CLASSES = ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson")
_COLOURS = ((230, 40, 40), (40, 180, 60), (40, 70, 230), (240, 200, 30), (200, 60, 220), (30, 200, 210))
_SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def draw_example(class_index: int, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in _COLOURS[class_index % len(_COLOURS)])
    shape = _SHAPES[class_index % len(_SHAPES)]
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=colour)
        draw.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=colour)
    return img


def make_image_tree(
    root: str | Path,
    classes=CLASSES,
    per_split: dict | None = None,
    size: int = 48,
    seed: int = 0,
    layout: str = "dataset",
) -> Path:
    """Write `root/dataset/<split>/<class>/pic_NNNN.jpg` (every 5th image a PNG) and return root."""
    per_split = per_split or {"train": 24, "val": 8}
    rng = random.Random(seed)
    root = Path(root)
    base = root / "dataset" if layout == "dataset" else root
    for split, count in per_split.items():
        for ci, name in enumerate(classes):
            folder = base / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = draw_example(ci, size, rng)
                if i % 5 == 4:
                    img.save(folder / f"pic_{i:04d}.png")
                else:
                    img.save(folder / f"pic_{i:04d}.jpg", quality=90)
    return root


def write_zero_member_tar_xz(path: str | Path, name: str, size: int, after=(), chunk: int = 64 << 20) -> Path:
    """A .tar.xz whose member `name` is `size` zero bytes (a multiple of `chunk`), then the `after`
    (name, bytes) members.

    Built in about a second and under 1 MB for 4 GiB: xz allows concatenated streams, so one
    compressed chunk of zeros is written size / chunk times.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    tail = io.BytesIO()
    with tarfile.open(fileobj=tail, mode="w") as tar:  # the following members and the end-of-archive blocks
        for member_name, data in after:
            member = tarfile.TarInfo(member_name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    zeros = lzma.compress(bytes(chunk), preset=0)
    with open(path, "wb") as f:
        f.write(lzma.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(size // chunk):
            f.write(zeros)
        f.write(lzma.compress(tail.getvalue()))
    return Path(path)
