"""Document cleaning before tokenization: Unicode normalisation, control characters, a content hash."""

from __future__ import annotations

import hashlib
import re
import unicodedata

NORMALIZATIONS = ("NFC", "NFKC", "none")
# Unicode category Cc (C0/C1 controls and DEL) except tab, newline and carriage return, which are whitespace.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str, normalization: str = "NFC") -> tuple[str, int]:
    """(cleaned text, control characters removed): normalised, controls stripped, outer whitespace trimmed."""
    if normalization != "none" and not unicodedata.is_normalized(normalization, text):
        text = unicodedata.normalize(normalization, text)
    cleaned, removed = _CONTROL.subn("", text)
    return cleaned.strip(), removed


def doc_hash(text: str) -> bytes:
    """16-byte content hash used to find exact duplicates across the corpus."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
