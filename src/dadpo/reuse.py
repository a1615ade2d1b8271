"""Content-addressed reuse: an artefact's key is a hash of exactly the inputs and settings it is made from, so
a run may take an artefact from any other run that holds it under the same key, and a setting the artefact
does not read never forces it to be made again.

Used for the pipeline's stage hashes (`dadpo.pipeline.stage_hash`), recover's shared artefacts (teacher and
student answers, the dSFT model, scores: `dadpo.recover.artefacts.artefact_keys`) and evaluation answer
caches (`dadpo.evaluate.run.seed_caches`).
"""

from __future__ import annotations

import hashlib
import json


def content_key(inputs: dict) -> str:
    """The key of an artefact made from `inputs` (JSON-able; key order does not matter)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
