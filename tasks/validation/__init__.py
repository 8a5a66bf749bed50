"""The data validation gate: Great Expectations suites per data kind, run over prepared splits.

``validate_frames(frames, cfg, report_dir)`` returns a ``ValidationReport`` and writes
``validation.json`` plus rendered Data Docs. Importing this package does not import
great_expectations (that happens on the first ``validate_frames`` call).
"""

from tasks.validation.gate import Failure, RuleResult, ValidationReport, validate_frames
from tasks.validation.suites import ValidationConfig

__all__ = ["Failure", "RuleResult", "ValidationConfig", "ValidationReport", "validate_frames"]
