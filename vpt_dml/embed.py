"""`python -m vpt_dml.embed WEIGHTS IMAGE_DIR OUT`: embeddings of a folder of images.

Writes OUT/embeddings.npy (float32, one L2-normalised row per image) and OUT/files.txt
(the image paths relative to IMAGE_DIR, in row order). WEIGHTS is a file written by
`python -m vpt_dml.export`; images are preprocessed as at test time (resize, center crop).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpt_dml.data.dataset import load_transformed
from vpt_dml.data.transforms import build_transforms
from vpt_dml.errors import UserError
from vpt_dml.export import ExportedModel, load_exported

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
EMBEDDINGS = "embeddings.npy"
FILE_LIST = "files.txt"


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively, sorted), or `root` itself if it is one."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"{root} does not exist; give a folder of images (or one image file)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


@torch.no_grad()
def embed_files(
    model: ExportedModel,
    files: Sequence[Path],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    pre = model.preprocessing
    transform = build_transforms(
        pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), train=False
    )
    embedder = model.embedder.to(device)
    rows = []
    for start in tqdm(
        range(0, len(files), batch_size), desc=desc, unit="batch", disable=not progress
    ):
        batch = torch.stack(
            [load_transformed(str(f), transform) for f in files[start : start + batch_size]]
        )
        rows.append(embedder(batch.to(device)).float().cpu())
    return torch.cat(rows).numpy() if rows else np.zeros((0, 0), dtype=np.float32)


def write_embeddings(out: Path, embeddings: np.ndarray, names: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / EMBEDDINGS, embeddings.astype(np.float32))
    (out / FILE_LIST).write_text("".join(f"{n}\n" for n in names))


def read_embeddings(folder: Path) -> tuple[np.ndarray, list[str]]:
    embeddings = np.load(folder / EMBEDDINGS)
    names = (folder / FILE_LIST).read_text().splitlines()
    if len(names) != len(embeddings):
        raise UserError(
            f"{folder}: {len(names)} files but {len(embeddings)} embeddings; run vpt_dml.embed again"
        )
    return embeddings, names


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "weights", type=Path, help="a .safetensors file from `python -m vpt_dml.export`"
    )
    parser.add_argument(
        "--backbone-weights", help="local checkpoint of the backbone (instead of the hub)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.embed", description=__doc__.split("\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("image_dir", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("out", type=Path, help="output folder for embeddings.npy and files.txt")
    args = parser.parse_args(argv)
    try:
        files = list_images(args.image_dir)
        model = load_exported(args.weights, backbone_weights=args.backbone_weights)
        emb = embed_files(model, files, args.batch_size, args.device, not args.no_progress)
        base = args.image_dir if args.image_dir.is_dir() else args.image_dir.parent
        write_embeddings(args.out, emb, [str(f.relative_to(base)) for f in files])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(files)} embeddings of dim {emb.shape[1]} to {args.out / EMBEDDINGS} (+ {FILE_LIST})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
