"""Moving Fashion-MNIST: clips of one Fashion-MNIST garment moving in a straight line, bouncing off the edges.

    python -m data.moving_fashion_mnist --out runs/mfmnist/clips [--train 10000 --test 2000] [--paths straight]

Each clip has two labels. Its `class` (the garment's) shows in any single frame. Its `direction` (DIRECTIONS,
the diagonal the garment starts along) shows only in the order of the frames. Without their order the frames
still show the line of motion, so a model blind to it can at best tell a direction from its reverse
(`order_blind_top1`): 50% top-1 on `--paths straight` clips, which never bounce, and more on the default
`bounce` clips, many of which end moving back the way they came.

A split's clips come from distinct images of that split of Fashion-MNIST (data/fashion_mnist.py, the offline
package), drawn with the seed; directions take turns, so each is a quarter of the clips. Writes
`OUT/<split>/<position>.mp4` (H.264, 16 frames (`--frames`) at 16 fps, 64 x 64 px, grey garment on black) and
then `OUT/<split>.json`, a list of {"file", "class", "direction", "source", "frames", "paths"} (the source image's
position in the idx file); a split whose list exists is not written again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from .fashion_mnist import CLASSES, FashionMnistError, idx_files, read_idx
from .make_shards.inputs import Input
from .synthetic import write_video

DIRECTIONS = ("up-left", "up-right", "down-left", "down-right")
STEPS = {"up-left": (-1, -1), "up-right": (-1, 1), "down-left": (1, -1), "down-right": (1, 1)}  # (dy, dx)
# Each direction's reverse: frames without their order show a clip's diagonal but not which way it was run.
OPPOSITE = tuple(next(DIRECTIONS.index(o) for o in DIRECTIONS if STEPS[o] == tuple(-v for v in STEPS[d]))
                 for d in DIRECTIONS)
FRAMES, SIZE, FPS = 16, 64, 16
SPEED = (1.5, 3.0)  # pixels per frame along each axis: 16 frames cross the 36 px of free space about once
PATHS = ("bounce", "straight")


def glide(direction: int, rng: np.random.Generator, free: np.ndarray, frames: int = FRAMES,
          paths: str = "bounce") -> tuple[np.ndarray, int]:
    """The garment's top-left corner in each frame [frames, 2] (row, column), starting at a random place within
    `free` (the room it has on each axis) and moving along DIRECTIONS[direction] at a random speed, reflected at
    each edge; and the direction it moves along when it reaches the last frame (the reverse of the clip played
    backwards). `paths="straight"`: the speed is at most what the room allows over the clip (60-100% of it) and
    the start is drawn where the whole path fits, so the garment never bounces."""
    unit = np.array(STEPS[DIRECTIONS[direction]], dtype=np.float64)
    if paths == "straight":
        fits = min(SPEED[1], free.min() / (frames - 1))
        travel = rng.uniform(0.6 * fits, fits) * (frames - 1)
        start = rng.uniform(0, 1, 2) * (free - travel)
        first = np.where(unit > 0, start, start + travel)
        return first + np.arange(frames)[:, None] * unit * travel / (frames - 1), direction
    position = rng.uniform(0, 1, 2) * free
    velocity = unit * rng.uniform(*SPEED)
    path, last = np.zeros((frames, 2)), direction
    for t in range(frames):
        path[t] = position
        position = position + velocity
        for axis in range(2):  # a bounce: mirror the overshoot back inside and turn round
            if position[axis] < 0 or position[axis] > free[axis]:
                position[axis] = -position[axis] if position[axis] < 0 else 2 * free[axis] - position[axis]
                velocity[axis] = -velocity[axis]
        if t == frames - 2:
            last = DIRECTIONS.index(next(d for d, step in STEPS.items() if step == tuple(np.sign(velocity))))
    return path, last


def moving_clip(garment: np.ndarray, direction: int, rng: np.random.Generator, frames: int = FRAMES,
                size: int = SIZE, paths: str = "bounce") -> np.ndarray:
    """[h, w] uint8 garment -> [T, size, size, 3] uint8 clip of the garment gliding (`glide`)."""
    h, w = garment.shape
    path, _ = glide(direction, rng, np.array([size - h, size - w], dtype=np.float64), frames, paths)
    clip = np.zeros((frames, size, size), dtype=np.uint8)
    for frame, (top, left) in zip(clip, np.round(path).astype(int)):
        frame[top : top + h, left : left + w] = garment
    return np.repeat(clip[..., None], 3, axis=-1)


def order_blind_top1(split: str, count: int, seed: int = 0, source: Path | None = None, garment: int = 28,
                     size: int = SIZE, frames: int = FRAMES, paths: str = "bounce") -> float:
    """The best direction top-1 (percent) on `write_clips`' clips of `split` for a model blind to frame order.
    A clip played backwards is as likely a clip, with the same frames, whose direction is the OPPOSITE of the
    one the clip ends with; such a model can only guess between the two, except when they are the same (the
    clip ends moving back the way it came)."""
    free = np.full(2, size - garment, dtype=np.float64)
    plan = clip_plan(split, count, seed, len(read_idx(idx_files(source)[split][1], 8)))
    lasts = [(d, glide(d, np.random.default_rng(s), free, frames, paths)[1]) for _, d, s in plan]
    return float(np.mean([1.0 if OPPOSITE[last] == d else 0.5 for d, last in lasts]) * 100)


def clip_plan(split: str, count: int, seed: int, images: int) -> list[tuple[int, int, int]]:
    """(source image, direction, clip seed) of each clip of `split`, drawn from `images` images with `seed`:
    distinct sources, directions in turn."""
    rng = np.random.default_rng([seed, len(split)])
    sources = np.sort(rng.permutation(images)[:count])
    return [(source, i % len(DIRECTIONS), int(rng.integers(2**31))) for i, source in enumerate(sources.tolist())]


def _write_one(job: tuple[str, np.ndarray, int, int, int, str]) -> None:
    path, garment, direction, seed, frames, paths = job
    write_video(path, moving_clip(garment, direction, np.random.default_rng(seed), frames, paths=paths), fps=FPS)


def write_clips(out: Path, counts: dict[str, int], seed: int = 0, source: Path | None = None,
                workers: int = 1, frames: int = FRAMES, paths: str = "bounce") -> dict[str, list[dict]]:
    """Write (or find) the clips of each split in `counts` ({"train": n, "test": m}), `frames` long, with
    `paths` (PATHS); returns {split: list}."""
    found = {}
    for split, count in counts.items():
        listing = out / f"{split}.json"
        if listing.is_file():
            rows = json.loads(listing.read_text())
            # lists written before "frames" and "paths" hold 16-frame clips that bounce
            made = {(row.get("frames", FRAMES), row.get("paths", "bounce")) for row in rows}
            if made != {(frames, paths)}:
                raise FashionMnistError(f"{listing} lists clips of (frames, paths) {sorted(made)}, not "
                                        f"{(frames, paths)}: use another folder, or delete it to write them again")
            found[split] = rows
            continue
        images_path, labels_path = idx_files(source)[split]
        images, labels = read_idx(images_path, 16), read_idx(labels_path, 8)
        if count > len(images):
            raise FashionMnistError(f"--{split} {count}: Fashion-MNIST's {split} split has only {len(images)} images")
        rows, jobs = [], []
        for i, (position, direction, clip_seed) in enumerate(clip_plan(split, count, seed, len(images))):
            file = f"{split}/{i:06d}.mp4"
            rows.append({"file": file, "class": int(labels[position]), "direction": direction, "source": position,
                         "frames": frames, "paths": paths})
            jobs.append((str(out / file), images[position], direction, clip_seed, frames, paths))
        (out / split).mkdir(parents=True, exist_ok=True)
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=64):
                pass
        temp = listing.with_suffix(".json.tmp")
        temp.write_text(json.dumps(rows))
        temp.replace(listing)
        found[split] = rows
    return found


def clip_inputs(out: Path, counts: dict[str, int], workers: int = 1, frames: int = FRAMES,
                paths: str = "bounce") -> dict[str, dict[str, list[Input]]]:
    """The clips of `write_clips` as shard inputs, once per label set: {"class" | "direction": {split: inputs}},
    in the same order in both."""
    found = write_clips(out, counts, workers=workers, frames=frames, paths=paths)
    return {labels: {split: [Input(str(out / r["file"]), r[labels], r["file"]) for r in rows]
                     for split, rows in found.items()} for labels in ("class", "direction")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=10000, help="clips made from train images")
    parser.add_argument("--test", type=int, default=2000, help="clips made from test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per clip (at 16 fps)")
    parser.add_argument("--paths", choices=PATHS, default="bounce", help="straight: the garment never bounces")
    parser.add_argument("--source", type=Path, help="folder with the *-ubyte.gz files (default: the package's)")
    args = parser.parse_args(argv)
    try:
        found = write_clips(args.out, {"train": args.train, "test": args.test}, args.seed, args.source,
                            workers=os.cpu_count() or 1, frames=args.frames, paths=args.paths)
    except FashionMnistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {len(rows)} clips" for split, rows in found.items()) + f" in {args.out} "
          f"(classes {', '.join(CLASSES)}; directions {', '.join(DIRECTIONS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
