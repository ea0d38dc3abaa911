"""`python -m vpt_dml.embed WEIGHTS IMAGE_DIR OUT`: embeddings of a folder of images.

Writes into OUT:
  embeddings.npy  float32, one L2-normalised row per image
  files.txt       the image paths relative to IMAGE_DIR, in row order
  embed.json      the image folder (absolute), the model's fingerprint, counts
  skipped.txt     with --skip-broken: the files that could not be decoded (path, reason)
WEIGHTS is a file written by `python -m vpt_dml.export`; images are preprocessed as at
test time (resize, center crop). Work is saved in chunks (OUT/chunks/) as it goes: an
interrupted run, rerun with the same arguments, resumes after the last finished chunk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.serving.embeddings import (
    EMBEDDINGS,
    FILE_LIST,
    META,
    SKIPPED,
    add_model_arguments,
    embed_folder,
    model_fingerprint,
)
from vpt_dml.serving.exported import load_exported


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.embed", description=__doc__.split("\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("image_dir", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("out", type=Path, help="output folder (embeddings.npy, files.txt, ...)")
    parser.add_argument(
        "--chunk-size", type=int, default=1024, help="images per saved chunk (the resume unit)"
    )
    args = parser.parse_args(argv)
    try:
        fingerprint = model_fingerprint(args.weights)
        model = load_exported(args.weights, backbone_weights=args.backbone_weights)
        args.out.mkdir(parents=True, exist_ok=True)
        meta = embed_folder(
            model,
            fingerprint,
            args.weights,
            args.image_dir,
            args.out,
            args.batch_size,
            args.device,
            not args.no_progress,
            args.skip_broken,
            args.chunk_size,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['count']} embeddings of dim {meta['dim']} to {args.out / EMBEDDINGS} "
        f"(+ {FILE_LIST}, {META}; paths relative to {meta['image_root']})"
    )
    if meta["skipped"]:
        print(
            f"skipped {meta['skipped']} undecodable image(s), listed in {args.out / SKIPPED}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
