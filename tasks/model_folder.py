"""Is ``model.name_or_path`` a model the stages can load? Asked before a run starts (``tasks.preflight``).

A wrong folder otherwise fails inside ``prepare`` with whatever transformers makes of it (a folder without
tokenizer files reads as "install sentencepiece or tiktoken"), after the run has started. Here a local folder
must hold what ``rlhf_core.models`` loads: ``config.json``, safetensors weights (``.bin`` files are never
unpickled) and tokenizer files; any other name must be in the local Hugging Face cache or answer on the hub.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
FOLDER_HOLDS = "a model folder holds config.json, *.safetensors weights and tokenizer files (tokenizer.json or others)"


def model_problem(name: str, root: Path, timeout: float) -> str | None:
    """Why ``name`` (relative paths are the workspace ``root``'s, where stages run) cannot be loaded, or ``None``."""
    from rlhf_core.data.loading import looks_like_path

    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if path.exists():
        return _folder_problem(path)
    if looks_like_path(name):
        return f"{path}: no such folder"
    return _hub_problem(name, timeout)


def _folder_problem(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path}: not a folder ({FOLDER_HOLDS})"
    missing = []
    if not (path / "config.json").is_file():
        missing.append("no config.json")
    if not any(path.glob("*.safetensors")):
        bins = sorted(p.name for p in path.glob("*.bin"))
        missing.append("no *.safetensors weights" + (f" (only {', '.join(bins)}: pickled weights are not loaded, as they "
                                                      "can run code; save the model with safetensors)" if bins else ""))
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return f"{path}: not a model folder: {'; '.join(missing)}" if missing else None


def _hub_problem(name: str, timeout: float) -> str | None:
    import os

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        try:
            from huggingface_hub import HfApi

            HfApi().model_info(name, timeout=timeout)
            return None
        except Exception as err:  # no network, unknown name, gated model: say which
            reason = f"the hub does not answer for it as a model ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    else:
        reason = "HF_HUB_OFFLINE is set"
    return (f"{name!r} is not a local folder, nor in the Hugging Face cache, and {reason}: "
            "point model.name_or_path at a local model folder")
