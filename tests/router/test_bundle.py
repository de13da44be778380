import numpy as np
import pytest

from router.bundle import BundleError, read_bundle, write_bundle
from router.models import LinearPart, PlattCalibrator, StackedModel


def small_model() -> StackedModel:
    linear = LinearPart(np.linspace(-1, 1, 384), 0.1)
    return StackedModel(np.array([0], dtype=np.int32), linear, None, PlattCalibrator())


def test_round_trip_and_digest(tmp_path):
    digest = write_bundle(tmp_path / "b", {"version": "t1"}, small_model(), None)
    bundle = read_bundle(tmp_path / "b")
    assert bundle.digest == digest and bundle.metadata["version"] == "t1"
    assert bundle.confidence is None
    read_bundle(tmp_path / "b", expected_digest=digest)
    with pytest.raises(BundleError, match="pinned"):
        read_bundle(tmp_path / "b", expected_digest="0" * 64)


def test_tampered_file_is_refused(tmp_path):
    write_bundle(tmp_path / "b", {"version": "t1"}, small_model(), small_model())
    arrays = tmp_path / "b" / "models.npz"
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(tmp_path / "b")


def test_unlisted_or_missing_files_are_refused(tmp_path):
    write_bundle(tmp_path / "b", {"version": "t1"}, small_model(), None)
    (tmp_path / "b" / "evil.pkl").write_bytes(b"x")
    with pytest.raises(BundleError, match="not in the manifest"):
        read_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="MANIFEST"):
        read_bundle(tmp_path)
