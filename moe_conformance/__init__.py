"""moe-conformance: a pytest conformance suite for Mixture-of-Experts implementations.

Importing this package is cheap (no torch): the pytest plugin imports it at start-up.
Arch plugins declare an ``ArchSpec``; see archs/ for examples.
"""

from .contract import Decoding, ExpertParallel, ExpertsProbe, ModulePair, Probes, RouterProbe, RouterReading
from .spec import ArchSpec, Capabilities, ExpectedFailure, SpecError, Variant

__all__ = ["ArchSpec", "Capabilities", "Decoding", "ExpectedFailure", "ExpertParallel", "ExpertsProbe", "ModulePair", "Probes",
           "RouterProbe", "RouterReading", "SpecError", "Variant"]
__version__ = "0.1.0"
