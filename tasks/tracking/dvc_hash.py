"""The hash DVC records in ``dvc.lock`` for an output, computed by DVC's own code (``dvc_data``)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def dvc_md5(path: Path, repo_root: Path | None = None) -> str:
    """The md5 DVC 3 records in ``dvc.lock`` for the output ``path`` (a file, or a directory: ``<md5>.dir``).

    Computed with ``dvc_data``'s ``build`` (what ``dvc commit``/``dvc repro`` run), honouring the
    ``.dvcignore`` rules of the DVC repo at ``repo_root`` (default: the repo ``path`` is in; none
    outside a repo). Nothing is written to the DVC cache.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.fs import LocalFileSystem
    from dvc.ignore import DvcIgnoreFilter
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB

    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"cannot hash output {path}: no such file or directory")
    if repo_root is None:
        try:
            repo_root = Path(Repo.find_root(str(path if path.is_dir() else path.parent)))
        except NotDvcRepoError:
            repo_root = None
    fs = LocalFileSystem()
    ignore = DvcIgnoreFilter(fs, str(Path(repo_root).resolve())) if repo_root is not None else None
    with tempfile.TemporaryDirectory(prefix="rlhf-dvc-hash-") as scratch:  # dry run: the ODB stays empty
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5", ignore=ignore, dry_run=True)
    return obj.hash_info.value
