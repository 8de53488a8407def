"""The optional NER layer of the PII scanner: PERSON and LOCATION from presidio-analyzer or spaCy.

Kept apart from the regex detectors because it is optional and heavy: nothing here is imported unless a scan asks
for names and places. The backend returns (label, start, end); `detectors.ner_findings` turns them into findings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from lmtailor.errors import ConfigError

NER_HINT = ("install an NER backend: `pip install presidio-analyzer` or `pip install spacy`, plus an English spaCy "
            "model package (en_core_web_sm; set LMTAILOR_SPACY_MODEL to use another)")


@functools.lru_cache(maxsize=1)
def ner_backend() -> Callable[[str], list[tuple[str, int, int]]]:
    import os

    model = os.environ.get("LMTAILOR_SPACY_MODEL", "en_core_web_sm")
    try:
        from presidio_analyzer import AnalyzerEngine  # type: ignore[import-not-found]
    except ImportError:
        AnalyzerEngine = None  # noqa: N806
    if AnalyzerEngine is not None:
        try:
            engine = AnalyzerEngine()
        except (OSError, ImportError, ValueError) as e:
            raise ConfigError(f"presidio-analyzer is installed but could not start: {e}", NER_HINT) from None

        def presidio(text: str) -> list[tuple[str, int, int]]:
            found = engine.analyze(text=text, entities=["PERSON", "LOCATION"], language="en")
            return [(r.entity_type, r.start, r.end) for r in found if r.score >= 0.5]

        return presidio
    try:
        import spacy  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("privacy NER was asked for but no NER backend is installed", NER_HINT) from None
    try:
        nlp = spacy.load(model, disable=["lemmatizer", "parser"])
    except OSError:
        raise ConfigError(f"spaCy is installed but its model '{model}' is not", NER_HINT) from None
    labels = {"PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION"}

    def spacy_ner(text: str) -> list[tuple[str, int, int]]:
        return [(labels[e.label_], e.start_char, e.end_char) for e in nlp(text).ents if e.label_ in labels]

    return spacy_ner


def ner_available() -> bool:
    """Whether an NER backend can be loaded (presidio-analyzer, or spaCy with its model)."""
    try:
        ner_backend()
    except ConfigError:
        return False
    return True
