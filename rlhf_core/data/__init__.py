"""The data layer: load raw records, normalise public formats, tokenise, collate.

    load_records(source)                  -> datasets.Dataset of raw rows       (loading)
    read_rows(source)                     -> raw rows with their place in the file (rows)
    normalize(ds, kind, format="auto")    -> prompt/prompt_messages/...          (formats)
    tokenize_sft / tokenize_preference / tokenize_prompts -> (ds, TokenizeStats) (tokenize)
    SFTCollator / PreferenceCollator -> padded tensors                          (collate)

Names are re-exported lazily (PEP 562): importing the package, or one submodule such as
``formats``, does not import the others' dependencies (``transformers``, ``torch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_core.lazy_exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "DataLoadError": "loading",
    "SUPPORTED_SUFFIXES": "loading",
    "load_records": "loading",
    "read_rows": "rows",
    "SOURCE_COLUMNS": "rows",
    "DataFormatError": "formats",
    "FORMATS_BY_KIND": "formats",
    "SFT_FORMATS": "formats",
    "PREFERENCE_FORMATS": "formats",
    "PROMPT_FORMATS": "formats",
    "detect_format": "formats",
    "normalize": "formats",
    "render_transcript": "messages",
    "TruncationConfig": "tokenize",
    "TokenizeStats": "tokenize",
    "IGNORE_INDEX": "tokenize",
    "tokenize_sft": "tokenize",
    "tokenize_preference": "tokenize",
    "tokenize_prompts": "tokenize",
    "SFTCollator": "collate",
    "PreferenceCollator": "collate",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from rlhf_core.data.collate import PreferenceCollator, SFTCollator
    from rlhf_core.data.formats import (
        FORMATS_BY_KIND,
        PREFERENCE_FORMATS,
        PROMPT_FORMATS,
        SFT_FORMATS,
        DataFormatError,
        detect_format,
        normalize,
    )
    from rlhf_core.data.loading import SUPPORTED_SUFFIXES, DataLoadError, load_records
    from rlhf_core.data.messages import render_transcript
    from rlhf_core.data.rows import SOURCE_COLUMNS, read_rows
    from rlhf_core.data.tokenize import (
        IGNORE_INDEX,
        TokenizeStats,
        TruncationConfig,
        tokenize_preference,
        tokenize_prompts,
        tokenize_sft,
    )

__getattr__ = lazy_exports(__name__, _EXPORTS)
