"""The learning package: the prompt embedding, the router's difficulty and confidence models,
the semantic cache's pair verifier, and their training, evaluation and calibration.

Importable without the gateway. This module is the one surface the gateway imports: serving
uses `RouterBundle` (see `router.serving`), the shared prompt embedding from `Embedder`, the
traffic features the decision log records, and the cache's `PairVerifier` with the vectors it
compares.
"""

from router.agreement import agreement as answer_agreement
from router.bundle import BundleError
from router.embedding import DIM, Embedder
from router.features import FEATURE_NAMES, feature_row
from router.pairs.vectors import Embed, cache_vector, windows
from router.pairs.verifier import PairDiff, PairVerifier, VerifierError, changed_part_cosines
from router.quality import QualityCalibrator, QualityTarget, QualityTargets, Scored
from router.serving import DEFAULT_BUNDLE, RouterBundle

__all__ = [
    "DEFAULT_BUNDLE", "DIM", "FEATURE_NAMES", "BundleError", "Embed", "Embedder", "PairDiff",
    "PairVerifier", "QualityCalibrator", "QualityTarget", "QualityTargets", "RouterBundle",
    "Scored", "VerifierError", "answer_agreement", "cache_vector",
    "changed_part_cosines", "feature_row", "windows",
]
