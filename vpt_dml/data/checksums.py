"""The archives each dataset is prepared from: size, MD5 / SHA-256, and where a still-public
copy may be downloaded (`url`, only where one is believed to serve the file today).

Values were not re-checked against the files from this machine (no network): each entry
names the public sources that record them. A value is None where no source publishes one
(In-Shop, the iNat split files, most sizes): prepare then records the hashes it saw.

Tests (and anyone holding a private mirror) extend or replace entries with a JSON file
named by $VPT_DML_CHECKSUMS: {"<file name>": {"size": ..., "md5": ..., "sha256": ...,
"url": ...}}; its entries take precedence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from vpt_dml.errors import UserError

ENV = "VPT_DML_CHECKSUMS"


@dataclass(frozen=True)
class Listed:
    name: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    url: str | None = None

    @property
    def published(self) -> bool:
        return bool(self.md5 or self.sha256)


TABLE: dict[str, Listed] = {
    e.name: e
    for e in [
        # size + SHA-256: issue 20 of this project; MD5 also in torchvision-style Cub2011
        # loaders (e.g. github.com/TDeVries/cub2011_dataset); URL: CaltechDATA record
        # 65de6-vp158, the Caltech page's current download.
        Listed(
            "CUB_200_2011.tgz",
            1_150_585_339,
            "97eceeb196236b17998738112f37df78",
            "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
        ),
        # size + SHA-256: issue 20; MD5 also in many StanfordOnlineProducts loaders that
        # point at ftp://cs.stanford.edu/cs/cvgl/ (gone): no public URL kept.
        Listed(
            "Stanford_Online_Products.zip",
            3_083_860_082,
            "7f73d41a2f44250d4779881525aea32e",
            "b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
        ),
        # Cars196, DML layout: size + MD5 issue 20; MD5s also in pytorch-metric-learning's
        # Cars196 (imagenet.stanford.edu/internal/car196/, gone).
        Listed("car_ims.tgz", 1_956_628_579, "d5c8f0aa497503f355e17dc7886c3f14"),
        Listed("cars_annos.mat", 394_471, "b407c6086d669747186bd1d764ff9dbc"),
        # Cars196, classification layout: MD5s issue 20; the devkit's and the test labels'
        # also in public Cars196 loaders (ai.stanford.edu/~jkrause/cars/, gone).
        Listed("cars_train.tgz", None, "065e5b463ae28d29e77c1b4b166cfe61"),
        Listed("cars_test.tgz", None, "4ce7ebf6a94d07f1952d94dd34c4d501"),
        Listed("cars_test_annos_withlabels.mat", None, "b0a2b23655a3edd16d84508592a98d10"),
        Listed("car_devkit.tgz", None, "c3b158d763b6e2245038c8ad08e45376"),
        # In-Shop (DeepFashion Google Drive): no published checksum.
        Listed("img.zip"),
        Listed("img_highres.zip"),
        Listed("list_eval_partition.txt"),
        # iNat 2018: MD5 in github.com/visipedia/inat_comp (2018 README) and torchvision's
        # INaturalist; URL: the competition's AWS open-data bucket named there.
        Listed(
            "train_val2018.tar.gz",
            None,
            "b1c6952ce38f31868cc50ea72d066cc3",
            None,
            "https://ml-inat-competition-datasets.s3.amazonaws.com/2018/train_val2018.tar.gz",
        ),
        # Smooth-AP split files (github.com/Andrew-Brown1/Smooth_AP): no published checksum.
        Listed("Inaturalist_train_set1.txt"),
        Listed("Inaturalist_test_set1.txt"),
    ]
}


def listed(name: str) -> Listed:
    """The table's entry for an archive, with $VPT_DML_CHECKSUMS's values on top."""
    entry = TABLE.get(name, Listed(name))
    extra = os.environ.get(ENV)
    if not extra:
        return entry
    try:
        table = json.loads(Path(extra).read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"${ENV}={extra} is not a readable JSON table ({e}); fix or unset it"
        ) from None
    if name in table:
        given = {k: v for k, v in table[name].items() if k in ("size", "md5", "sha256", "url")}
        entry = replace(entry, **given)
    return entry
