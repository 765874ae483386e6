"""The shared parser for outside JSON: every kind of bad document is one FormatError line."""

from __future__ import annotations

import pytest

from nydus.errors import ConfigError, FormatError
from nydus.format.safejson import MAX_JSON_DEPTH, parse_json, parse_json_object


@pytest.mark.parametrize(
    "doc",
    [
        b"[" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b"1" * 5000,
        b"1e999999",
        b"NaN",
        b"[Infinity]",
        b"\xff\xfe{}",
        b"{not json",
        b"",
    ],
)
def test_bad_documents_are_one_line_format_errors(doc: bytes) -> None:
    with pytest.raises(FormatError) as info:
        parse_json(doc, "test document")
    message = str(info.value)
    assert message.startswith("test document ")
    assert "\n" not in message and len(message) < 240


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    deep_text = "[{" * 200 + '\\"'
    doc = parse_json_object('{"k": "' + deep_text + '"}', "doc")
    assert doc == {"k": deep_text.replace('\\"', '"')}


def test_limit_depth_is_accepted() -> None:
    doc = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(doc, "doc") is not None


def test_size_limit_and_error_family() -> None:
    with pytest.raises(ConfigError, match="over the 10-byte limit"):
        parse_json(b'{"a": "0123456789"}', "config", max_size=10, error=ConfigError)
    with pytest.raises(FormatError, match="not a JSON object"):
        parse_json_object(b"[1]", "manifest")
