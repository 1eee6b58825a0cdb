"""The README says what works: its tuspy example stores the file under its own name, and no link in
the README or docs/ leads out of the repository (the documentation must read offline, from a checkout)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from tests.fixtures.server import LiveServer

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<(https?://[^>]+)>")


def readme_tuspy_example() -> str:
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```python\n(from tusclient.*?)```", readme, flags=re.S)
    return block


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_the_readme_tuspy_example_stores_the_file_under_its_name(server: LiveServer, tmp_path: Path) -> None:
    source = tmp_path / "scan.tiff"
    source.write_bytes(os.urandom(100_000))
    code = readme_tuspy_example().replace("http://127.0.0.1:8020/files/", server.files_url)
    code = code.replace('"scan.tiff", chunk_size', f'"{source}", chunk_size', 1)  # the file to read, not its name
    await asyncio.to_thread(exec, code, {})
    files = (tmp_path / "elements" / "local").rglob("*")
    (stored,) = [path.name for path in files if path.is_file() and not path.name.endswith(".attr.json")]
    assert stored.startswith("scan_"), stored  # without a filename the stem would be the upload's id


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_no_link_in_the_documentation_leads_out_of_the_repository(document: Path) -> None:
    targets = [first or second for first, second in LINK.findall(document.read_text())]
    outside = [target for target in targets if re.match(r"[a-z][a-z0-9+.-]*:", target)]
    assert outside == []
    for target in targets:
        path = target.split("#", 1)[0]
        if path:
            assert (document.parent / path).exists(), f"{document.name} links to {target}, which is not there"
