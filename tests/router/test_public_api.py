import ast
from pathlib import Path

import router

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


def test_exported_members():
    assert set(router.__all__) == {
        "BundleError", "DEFAULT_BUNDLE", "DIM", "Embed", "Embedder", "FEATURE_NAMES",
        "PairDiff", "PairVerifier", "QualityCalibrator", "QualityTarget", "QualityTargets",
        "RouterBundle", "Scored", "VerifierError", "answer_agreement",
        "cache_vector", "changed_part_cosines", "feature_row", "windows",
    }
    for name in router.__all__:
        assert getattr(router, name) is not None


def test_the_gateway_imports_router_only_through_its_surface():
    """`from router import NAME` with NAME in `router.__all__`; never a router submodule."""
    for path in GATEWAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("router"):
                assert node.module == "router", f"{path}: from {node.module} import ..."
                assert {a.name for a in node.names} <= set(router.__all__), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("router") for a in node.names), path
