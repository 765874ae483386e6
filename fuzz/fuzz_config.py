"""Atheris fuzz target: bytes -> the daemon configuration parser (``nydus.config``).

The input is a config text (JSON v1/v2, or TOML v2) given to ``DaemonConfig.from_json`` with
an empty environment, strict and as a template. A config that parses must round-trip:
``from_json(cfg.to_dict())`` equals it and ``to_json`` is valid JSON.

Contract: ConfigError (a NydusError) with a message or success; nothing else (no
RecursionError, TypeError, ...), within the time limit.

    nice -n 10 .venv/bin/python fuzz/fuzz_config.py fuzz/corpus-config -atheris_runs=1000000 \\
        -timeout=10 -artifact_prefix=fuzz/regressions/config-

Single-threaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzlib

fuzzlib.add_src_to_path()

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["nydus"]):
        from nydus.config import DaemonConfig
        from nydus.errors import NydusError
else:
    from nydus.config import DaemonConfig
    from nydus.errors import NydusError

__all__ = ["NydusError", "check"]


def check(data: bytes) -> None:
    for template in (False, True):
        try:
            cfg = DaemonConfig.from_json(data, environ={}, template=template)
        except NydusError:
            if template:
                raise
            continue
        again = DaemonConfig.from_json(cfg.to_dict(), environ={}, template=template)
        assert again == cfg, (cfg, again)
        json.loads(cfg.to_json())


def replay(data: bytes) -> BaseException | None:
    return fuzzlib.replay(check, data, NydusError)


if __name__ == "__main__":
    fuzzlib.fuzz_main(check, NydusError)
