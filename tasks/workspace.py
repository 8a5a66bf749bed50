"""The pipeline's files: where each stage reads and writes, relative to the project root.

These paths are the ``deps``/``outs`` of ``dvc.yaml``; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def here(cls) -> Workspace:
        """The project root: ``$RLHF_WORKSPACE`` or the current directory (DVC runs stages there)."""
        return cls(Path(os.environ.get("RLHF_WORKSPACE", ".")).resolve())

    # data
    @property
    def sources(self) -> Path:
        """Snapshots of the configured data sources (``tasks.ingest``), read by ``prepare``."""
        return self.root / "data" / "sources"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    def split(self, name: str) -> Path:
        """``sft_train``, ``sft_test``, ``pref_train``, ``pref_test``, ``prompts`` -> a JSON-lines file."""
        return self.prepared / f"{name}.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "data" / "tokenizer"

    # models
    def model(self, stage: str) -> Path:
        """Final model of a training stage: ``models/sft``, ``models/reward``, ``models/ppo``, ``models/dpo``."""
        return self.root / "models" / stage

    def checkpoints(self, stage: str) -> Path:
        """Trainer checkpoints (not tracked by DVC: they exist only to resume an interrupted stage)."""
        return self.root / "checkpoints" / stage

    # reports
    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def plots(self, stage: str) -> Path:
        return self.root / "plots" / stage

    def reports(self, stage: str) -> Path:
        return self.root / "reports" / stage

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"


def state_dir(project_dir: Path) -> Path:
    """The pipeline's own state outside git and DVC (ingest's source identities, tracking
    calls kept while the tracking server was down): ``$RLHF_STATE_DIR``, else ``<project>/.rlhf``.

    Isolated flow runs point every worktree at the workspace's folder, so what one run
    records there is known to the next.
    """
    return Path(os.environ.get("RLHF_STATE_DIR") or Path(project_dir) / ".rlhf")


SPLITS = ("sft_train", "sft_test", "pref_train", "pref_test", "prompts")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a crash never leaves half a metrics file); NaN/inf become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (in nested dicts and lists too) replaced by None: valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def file_md5(path: Path) -> str:
    """md5 of a file's bytes: the digest DVC records for it, so the DVC cache can be looked up by it."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
