"""lab: a reproducible benchmark lab in which a coding agent hill-climbs on real code.

The lab owns the loop, the numbers and the verdict; see docs/ and the README.
"""

from .harness import Harness
from .records import Build, Check, CheckItem, Environment, Metric, Sample

__version__ = "0.1.0"
__all__ = ["Harness", "Build", "Check", "CheckItem", "Environment", "Metric", "Sample", "__version__"]
