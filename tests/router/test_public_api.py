import router


def test_exported_members():
    assert set(router.__all__) == {
        "BundleError", "Embedder", "RouterBundle", "FEATURE_NAMES", "feature_row",
    }
    for name in router.__all__:
        assert getattr(router, name) is not None
