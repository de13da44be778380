"""The shipped policies as a stand-in frontier needs them.

The shipped `auto` and `chat` hold a quality target: they keep small answers only where labels
from the frontier show the target holds, and until then they escalate everything. A stand-in
frontier (the scripted upstream of the demo, the tests and the benchmarks) is not a model, so
its labels mean nothing. Against one, those two policies judge answers by a fixed threshold
on the small model's own token probabilities instead, so that a question decides its route.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
# exp(mean token logprob) at which an answer is kept, and the least likely token allowed
FIXED_CONFIDENCE: dict[str, dict[str, Any]] = {
    "default.yaml": {"scorer": "logprob", "threshold": 0.5, "min_token_logprob": -9.0},
    "chat.yaml": {"scorer": "logprob", "threshold": 0.55, "min_token_logprob": -8.0},
}


def fixed_threshold_policies(target: Path, source: Path = SHIPPED) -> Path:
    """A copy of the policies in `source` with `auto` and `chat` at fixed thresholds."""
    shutil.copytree(source, target)
    for name, confidence in FIXED_CONFIDENCE.items():
        path = target / name
        policy = yaml.safe_load(path.read_text())
        for key in ("quality", "learning"):
            policy.pop(key, None)
        policy["confidence"] = dict(confidence)
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return target
