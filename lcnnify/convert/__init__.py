"""Model -> LCNN: tracing, the replacement table, the rewrite and the report (DESIGN §3)."""
from .api import lcnnify, validate
from .report import ConversionReport

__all__ = ["lcnnify", "validate", "ConversionReport"]
