"""Privacy: find and scrub personal data, check a run for memorized secrets.

`detectors.scan(text)` finds PII spans (regexes with checksums, optional NER); `scrub` replaces them with
placeholders or keyed pseudonyms and writes an audit; `canary` plants secrets and measures their exposure.
"""
