"""Model -> LCNN: tracing, the replacement table, the rewrite, the report, the converted model's persistence."""
from .api import lcnnify, validate
from .model import LCNNGraphModule
from .report import ConversionReport
from .state_dict import load_plain_state_dict

__all__ = ["lcnnify", "validate", "ConversionReport", "LCNNGraphModule", "load_plain_state_dict"]
