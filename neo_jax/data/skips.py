"""Why a record was skipped. Bad input never stops a run and is never replaced by another sample: the
record is dropped, counted under one of these reasons, and logged once with its id."""
from __future__ import annotations

MISSING_FILE = "missing_file"            # an image path that does not exist
BAD_IMAGE = "bad_image"                  # unreadable or truncated image bytes
EMPTY_CONVERSATION = "empty_conversation"  # no turns, or no assistant turn with text
BAD_CONVERSATION = "bad_conversation"    # unknown role or malformed turn
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # number of <image> tags != number of images
ASPECT_RATIO = "aspect_ratio"            # long side / short side > 200
OVERSIZE = "oversize"                    # more tokens than seq_len or more patches than patch_budget
BAD_RECORD = "bad_record"                # a stored record that does not decode
REASONS = (MISSING_FILE, BAD_IMAGE, EMPTY_CONVERSATION, BAD_CONVERSATION, IMAGE_COUNT_MISMATCH,
           ASPECT_RATIO, OVERSIZE, BAD_RECORD)


class Skip(Exception):
    """Raised while reading or encoding a record that must be skipped; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
