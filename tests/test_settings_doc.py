"""README's settings tables are the declarations: generated from them, and compared with them here.

``python -m tests.test_settings_doc --write`` regenerates the block between the markers in README.md (after a
declaration changed); the test fails whenever the two differ, or a declared variable is missing or listed twice.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from common.declare import Declared
from common.settings_doc import markdown
from memory_manager.config import MemorySettings
from orchestrator.config import FleetSettings, StartupSettings
from registration.config import RegistrationSettings
from router.config import RouterSettings
from workers.chat.settings import ChatSettings
from workers.sdxl.settings import SdxlSettings
from workers.wan.settings import WanSettings

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- settings: generated from the declarations by `python -m tests.test_settings_doc --write` -->"
END = "<!-- /settings -->"

#: Every process and the settings classes it parses, in the order README shows their groups.
PROCESSES: dict[str, list[type[Declared]]] = {
    "SDXL worker": [SdxlSettings],
    "WAN worker (and `wan_generate.py`)": [WanSettings],
    "chat worker": [ChatSettings],
    "router": [RouterSettings],
    "memory manager": [MemorySettings],
    "registration": [RegistrationSettings],
    "orchestrator": [FleetSettings, StartupSettings],
}
CLASSES = [cls for classes in PROCESSES.values() for cls in classes]


def generated() -> str:
    return f"{BEGIN}\n\n{markdown(PROCESSES)}\n{END}"


def readme_block(text: str) -> str:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.S)
    assert match, f"README.md has no generated settings block ({BEGIN} ... {END})"
    return match.group(0)


def test_the_readme_tables_are_the_declarations() -> None:
    assert readme_block(README.read_text()) == generated(), \
        "README.md's settings tables differ from the declarations: run python -m tests.test_settings_doc --write"


def test_every_declared_variable_has_exactly_one_row() -> None:
    first_cells = re.findall(r"^\| `([A-Z0-9_]+)` \|", README.read_text(), re.M)
    declared = {name for cls in CLASSES for _, v in cls.declarations() for name in v.names()}
    assert sorted(name for name in set(first_cells) if first_cells.count(name) > 1) == []
    assert sorted(declared - set(first_cells)) == []


def test_every_alias_is_named_in_its_variables_row() -> None:
    text = README.read_text()
    for cls in CLASSES:
        for _, v in cls.declarations():
            for alias in v.aliases:
                assert re.search(rf"^\| `{v.env}` \|.*also read as `{alias}`", text, re.M), alias


def test_the_generator_shows_defaults_as_they_are_written() -> None:
    table = markdown({"router": [RouterSettings]})
    assert "| `ROUTER_THREADS` | 16 | " in table and "| `ROUTER_MAX_BODY_MB` | 16 | " in table
    assert "| `SDXL_PORT` | 7859 | loopback port of sdxl" in table
    assert "### Ports\n\nRead by: router." in table


def write() -> None:
    text = README.read_text()
    README.write_text(text.replace(readme_block(text), generated()))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_settings_doc --write")
    write()
