"""Versioned model bundles: a folder of plain files plus a sha256 manifest.

Layout::

    bundle.json       format, version, date, feature spec, training-data fingerprint, metrics
    models.npz        the model arrays (numpy, loaded with allow_pickle=False)
    MODEL_CARD.md     optional, human-readable
    MANIFEST.sha256   `sha256sum` lines for every other file (check with `sha256sum -c`)

Loading verifies every hash before reading a byte of model data, refuses files the manifest
does not list, and can pin the manifest's own digest. Nothing executable is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.models import StackedModel

__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleError", "read_bundle", "write_bundle"]

BUNDLE_FORMAT = "smallfirst-router-bundle/1"
MANIFEST = "MANIFEST.sha256"
META = "bundle.json"
ARRAYS = "models.npz"


class BundleError(ValueError):
    """A bundle is missing, malformed, or does not match its manifest."""


@dataclass(frozen=True)
class Bundle:
    """What a bundle folder holds, once verified."""

    metadata: dict
    difficulty: StackedModel
    confidence: StackedModel | None
    digest: str  # sha256 of the manifest: identifies this exact bundle


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bundle(
    directory: Path, metadata: dict, difficulty: StackedModel, confidence: StackedModel | None,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write a bundle folder; returns its digest. Existing bundle files are replaced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = difficulty.to_arrays("difficulty/")
    if confidence is not None:
        arrays.update(confidence.to_arrays("confidence/"))
    with (directory / ARRAYS).open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    meta = {"format": BUNDLE_FORMAT, **metadata}
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    return write_manifest(directory)


def write_manifest(directory: Path) -> str:
    """(Re)hash every file in the folder into the manifest; returns the manifest digest."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST)
    lines = "".join(f"{_sha256(p)}  {p.name}\n" for p in files)
    (Path(directory) / MANIFEST).write_text(lines)
    return hashlib.sha256(lines.encode()).hexdigest()


def verify(directory: Path, expected_digest: str | None = None) -> tuple[dict[str, str], str]:
    """Check the manifest against the files; returns (name -> sha256, manifest digest)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{directory}: no {MANIFEST}; not a router bundle")
    text = manifest.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if expected_digest and digest != expected_digest:
        raise BundleError(f"{directory}: manifest digest {digest} is not the pinned one")
    listed = {}
    for line in text.splitlines():
        sha, _, name = line.partition("  ")
        if not sha or "/" in name or name.startswith("."):
            raise BundleError(f"{directory}: malformed manifest line {line!r}")
        listed[name] = sha
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST}
    if present - set(listed):
        extra = sorted(present - set(listed))
        raise BundleError(f"{directory}: files not in the manifest: {extra}")
    for name, sha in listed.items():
        path = directory / name
        if not path.is_file() or _sha256(path) != sha:
            raise BundleError(f"{directory}: {name} does not match its sha256 in the manifest")
    if META not in listed or ARRAYS not in listed:
        raise BundleError(f"{directory}: manifest must list {META} and {ARRAYS}")
    return listed, digest


def read_bundle(directory: Path, expected_digest: str | None = None) -> Bundle:
    """Verify, then load a bundle folder."""
    directory = Path(directory)
    _, digest = verify(directory, expected_digest)
    metadata = json.loads((directory / META).read_text())
    if metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{directory}: unsupported bundle format {metadata.get('format')!r}")
    try:
        with np.load(directory / ARRAYS, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        difficulty = StackedModel.from_arrays(arrays, "difficulty/")
        has_confidence = "confidence/columns" in arrays
        confidence = StackedModel.from_arrays(arrays, "confidence/") if has_confidence else None
    except (KeyError, ValueError) as exc:
        raise BundleError(f"{directory}: malformed {ARRAYS}: {exc}") from exc
    return Bundle(metadata, difficulty, confidence, digest)
