"""``nydusify convert --oci-ref`` refuses, before touching a registry, what it cannot write."""

from __future__ import annotations

from typing import cast

import pytest

from nydus.convert.converter import ConvertOptions
from nydus.convert.ociref import convert_oci_ref
from nydus.convert.remote import Remote
from nydus.errors import ConfigError


@pytest.mark.parametrize(
    "opts",
    [
        ConvertOptions(docker_v2_format=True),
        ConvertOptions(chunk_dict="bootstrap:local:/x"),
        ConvertOptions(all_platforms=True),
        ConvertOptions(merge_platform=True),
    ],
)
def test_unsupported_options_are_config_errors(opts: ConvertOptions) -> None:
    with pytest.raises(ConfigError):
        convert_oci_ref(cast(Remote, None), cast(Remote, None), opts)
