"""The semantic cache's pair verifier: may the answer cached for one question be served for
another? Canonical forms (`canonical`), pair features and the shipped model (`verifier`), the
vectors it compares (`vectors`), training (`training`) and evaluation (`evaluate`)."""
