"""Retrieval metrics for a labelled query folder against a labelled gallery folder.

A labelled folder holds one subfolder per class (images anywhere below it); a class is
the same in both folders when its subfolder has the same name. Metrics are the suite's
own (`evaluation.retrieval.retrieval_metrics` in gallery mode: queries ranked against the
gallery only, exact, the tie rule of `evaluation.knn`). A query whose class has no
gallery image has nothing to retrieve: it is left out of every metric and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpt_dml.errors import UserError
from vpt_dml.evaluation.retrieval import retrieval_metrics
from vpt_dml.serving.embeddings import embed_files, list_images
from vpt_dml.serving.exported import ExportedModel


def labelled_images(root: Path, role: str) -> tuple[list[Path], list[str]]:
    """(image files, class name of each): the first folder level below `root` is the class."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"--{role} {root} is not a folder; give a folder with one subfolder per class"
        )
    files = list_images(root)
    loose = [f for f in files if f.parent == root]
    if loose:
        raise UserError(
            f"--{role} {root} holds images outside a class subfolder ({loose[0].name}); "
            "put each image in a subfolder named after its class"
        )
    return files, [f.relative_to(root).parts[0] for f in files]


@dataclass
class FolderEmbeddings:
    embeddings: np.ndarray
    classes: list[str]
    files: list[Path]
    skipped: list[tuple[Path, str]]


def embed_labelled(model: ExportedModel, root: Path, role: str, **kw) -> FolderEmbeddings:
    files, classes = labelled_images(root, role)
    done = embed_files(model, files, desc=role, **kw)
    if not done.kept:
        raise UserError(f"no image under --{role} {root} could be decoded")
    return FolderEmbeddings(
        done.embeddings,
        [classes[i] for i in done.kept],
        [files[i] for i in done.kept],
        done.skipped,
    )


def folder_metrics(
    queries: FolderEmbeddings, gallery: FolderEmbeddings, ks: tuple[int, ...]
) -> dict:
    """The suite's metrics in gallery mode, plus the counts a reader needs to trust them."""
    names = sorted(set(queries.classes) | set(gallery.classes))
    code = {c: i for i, c in enumerate(names)}
    ql = np.array([code[c] for c in queries.classes])
    gl = np.array([code[c] for c in gallery.classes])
    lone = int(np.sum(~np.isin(ql, gl)))
    metrics = retrieval_metrics(queries.embeddings, ql, ks, gallery.embeddings, gl)
    return {
        "metrics": metrics,
        "queries": len(ql),
        "gallery": len(gl),
        "query_classes": len(set(queries.classes)),
        "gallery_classes": len(set(gallery.classes)),
        "queries_without_gallery_class": lone,
    }


def same_files(queries: Path, gallery: Path) -> bool:
    """True when both folders hold the same image files (resolved: links count); refuses
    folders that share only some (a shared query would be its own nearest neighbour)."""
    q = {f.resolve() for f in labelled_images(queries, "queries")[0]}
    g = {f.resolve() for f in labelled_images(gallery, "gallery")[0]}
    shared = q & g
    if shared and q != g:
        raise UserError(
            f"{len(shared)} of the {len(q)} query images are also gallery images (first: "
            f"{min(shared)}): each would find itself; give disjoint folders, or the same "
            "folder as both to leave each query out of its own neighbours"
        )
    return bool(shared)


def leave_one_out_metrics(queries: FolderEmbeddings, ks: tuple[int, ...]) -> dict:
    """One set as queries and gallery: the suite's query-equals-gallery metrics (each query
    excluded from its own neighbours); a class of one image has nothing to retrieve."""
    names, labels, sizes = np.unique(queries.classes, return_inverse=True, return_counts=True)
    return {
        "metrics": retrieval_metrics(queries.embeddings, labels, ks),
        "mode": "leave-one-out",
        "queries": len(labels),
        "gallery": len(labels),
        "query_classes": len(names),
        "gallery_classes": len(names),
        "queries_without_gallery_class": int(np.sum(sizes[labels] == 1)),
    }
