"""Classify your own videos and images with a fine-tuned run or an official checkpoint.

    python -m finetune.predict --checkpoint runs/demo/finetune clip.mp4 [photo.jpg ...]
    python -m finetune.predict --checkpoint hiera_base_16x224.pth --model hiera_base_16x224 clip.mp4 --json

Prints the top classes with their probabilities: softmax scores averaged over spatial x temporal views, as
in evaluation (the run's views by default). A multi-label model (its run set data.multi_label) prints every
class whose sigmoid score, the maximum over the views as in evaluation, reaches --threshold (0.5).
--checkpoint takes a fine-tuning output_dir, one of its checkpoint-* directories, its encoder.safetensors, or
any checkpoint models.load_pretrained reads (then --model names the architecture; 400 outputs get the
Kinetics-400 class names). A file that cannot be read gets one line on stderr and the others are still
predicted; the exit code is then 1. --json prints a list with one {"file", "predictions": [{"class", "index",
"probability"}]} or {"file", "error"} per file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data import DecodeError
from engine.errors import one_line_errors

from .inference import Loaded, at_least_one, file_clips, load_model


@torch.no_grad()
def predict_file(loaded: Loaded, path: Path, views: tuple[int | None, int | None], batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """Class probabilities [K] of one file: the mean of its views' softmax scores, or for a multi-label model
    the maximum of their sigmoid scores (views None: the run's)."""
    clips = file_clips(path, loaded, views)
    logits = torch.cat([loaded.model(part.to(device)).float() for part in clips.split(batch_size)])
    if loaded.multi_label:
        return logits.sigmoid().max(0).values.cpu()
    return logits.softmax(-1).mean(0).cpu()


def chosen(probs: torch.Tensor, loaded: Loaded, top: int, threshold: float) -> list[dict]:
    """The classes to show, most probable first: the `top` ones, or for a multi-label model every one whose
    score reaches `threshold`."""
    order = probs.argsort(descending=True).tolist()
    picked = [i for i in order if probs[i] >= threshold] if loaded.multi_label else order[:top]
    return [{"class": loaded.classes[i], "index": i, "probability": float(probs[i])} for i in picked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="videos and images")
    parser.add_argument("--checkpoint", required=True, help="fine-tuning run, checkpoint dir or file")
    parser.add_argument("--model", help="architecture of a checkpoint that does not name it, e.g. hiera_base_16x224")
    parser.add_argument("--spatial-views", type=at_least_one, help="crops across the frame (default: the run's)")
    parser.add_argument("--temporal-views", type=at_least_one, help="clips along the video (default: the run's)")
    parser.add_argument("--top", type=at_least_one, default=5, help="classes shown per file")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="multi-label models: show the classes whose sigmoid score reaches this")
    parser.add_argument("--batch-size", type=at_least_one, default=16, help="clips per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    args = parser.parse_args(argv)
    with one_line_errors(KeyError, TypeError):  # and weights that do not fit the architecture named
        loaded = load_model(args.checkpoint, args.model, need_head=True)
    device = torch.device(args.device)
    loaded.model.to(device)
    views = (args.spatial_views, args.temporal_views)
    results, failed = [], 0
    for path in args.files:
        try:
            probs = predict_file(loaded, path, views, args.batch_size, device)
        except (OSError, DecodeError) as err:
            failed += 1
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            print(f"error: {path}: {' '.join(reason.split())}", file=sys.stderr)  # one line
            results.append({"file": str(path), "error": reason})
            continue
        predictions = chosen(probs, loaded, args.top, args.threshold)
        results.append({"file": str(path), "predictions": predictions})
        if not args.json:
            width = max((len(p["class"]) for p in predictions), default=0)
            lines = [f"  {p['class']:<{width}}  {100 * p['probability']:5.1f}%" for p in predictions]
            print("\n".join([str(path), *lines]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
