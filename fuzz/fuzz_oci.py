"""Atheris fuzz target: bytes -> the OCI manifest and index parsers.

The input is a manifest body (JSON). It goes through ``oci.manifest_media_type`` (Content-Type
absent, so the body decides), then, by that media type or both when unknown, through
``convert.image.parse_manifest`` (with and without ``for_conversion``) and
``convert.image.parse_index`` and ``oci.Descriptor.from_dict`` on every descriptor. Parsed
descriptors must round-trip through ``to_dict``. (The snapshotter's own manifest reading,
``nydus_blob_layers``, is not covered here: it goes through ``safejson.parse_json_object_or_none``.)

Contract: NydusError (FormatError, UnsupportedError) with a message or success; nothing else
(RecursionError from deeply nested JSON is a crash), within the time limit.

    nice -n 10 .venv/bin/python fuzz/fuzz_oci.py fuzz/corpus-oci -atheris_runs=1000000 \\
        -timeout=10 -artifact_prefix=fuzz/regressions/oci-

Single-threaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzlib

fuzzlib.add_src_to_path()

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["nydus"]):
        from nydus.convert import image
        from nydus.errors import NydusError
        from nydus.format import oci
else:
    from nydus.convert import image
    from nydus.errors import NydusError
    from nydus.format import oci

__all__ = ["NydusError", "check"]

DIGEST = "sha256:" + "0" * 64


def _roundtrip(d: oci.Descriptor) -> None:
    assert oci.Descriptor.from_dict(d.to_dict()) == d, d


def check(data: bytes) -> None:
    mt = oci.manifest_media_type(data)
    assert isinstance(mt, str) and mt
    tried = 0
    if not oci.is_index(mt):
        tried += 1
        for media in (mt, oci.MEDIA_TYPE_OCI_MANIFEST):
            try:
                m = image.parse_manifest(data, media, DIGEST, for_conversion=False)
            except NydusError:
                continue
            _roundtrip(m.config)
            for ld in m.layers:
                _roundtrip(ld)
            image.is_nydus_manifest(m)
            image.parse_manifest(data, media, DIGEST, for_conversion=True)
    if not oci.is_manifest(mt):
        tried += 1
        _doc, entries = image.parse_index(data, DIGEST)
        for e in entries:
            _roundtrip(e.descriptor)
        image.select_platforms(entries, None, all_platforms=True)
    assert tried


def replay(data: bytes) -> BaseException | None:
    return fuzzlib.replay(check, data, NydusError)


if __name__ == "__main__":
    fuzzlib.fuzz_main(check, NydusError)
