"""The learning package: features, difficulty and confidence models, train / evaluate / calibrate.

Importable without the gateway. Serving uses `RouterBundle` (see `router.serving`) and the
shared prompt embedding from `Embedder`.
"""

from router.bundle import BundleError
from router.embedding import Embedder
from router.features import FEATURE_NAMES, feature_row
from router.serving import RouterBundle

__all__ = ["FEATURE_NAMES", "BundleError", "Embedder", "RouterBundle", "feature_row"]
