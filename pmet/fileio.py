"""Writing files: atomic single files, and a command's outputs staged and moved into place together.

mkstemp/mkdtemp create files and folders for the owner only; outputs get the usual permissions (0o666 or
0o777 minus the umask), like any file the user writes.

The output rules of every `pmet` command (README, "Outputs"):
- every output is declared before any work starts, so a path that cannot be written fails at once;
- a named output file (`--report`) that exists is replaced only with `--force`;
- an output folder (`--out`) must be new or empty; with `--force` pmet replaces in it only what pmet wrote there
  before (listed in the folder's manifest, `.pmet-outputs.json`), and never touches any other file;
- everything is written to staging paths beside its destination first, and moved into place only once every
  output was written, so a failure leaves the destinations as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import PmetError

MANIFEST = ".pmet-outputs.json"


class OutputError(PmetError):
    """An output path that cannot or may not be written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, flush it to disk, then move the temp file onto `path` (removed if anything fails,
    Ctrl-C included), so a reader or a rerun never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_folder)`, then move the folder onto `path` (which must not exist yet); the temp folder is
    removed if anything fails, Ctrl-C included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        _ordinary_permissions(tmp, _umask())
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


def json_writer(data: object, ensure_ascii: bool = True) -> Callable[[str | os.PathLike], None]:
    """A writer of `data` as indented UTF-8 JSON, for `atomic_write` or `Outputs.write`."""
    def write(path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=ensure_ascii) + "\n", encoding="utf-8")
    return write


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path, option: str) -> None:
    """Create and remove a probe file in the nearest existing folder above `path` (works for root too)."""
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: cannot write there: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pmet-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {folder}: {e.strerror or e}") from None


def owned_entries(folder: Path) -> set[str]:
    """The entries of `folder` that pmet wrote there (its manifest), empty when it has none."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return {str(e) for e in data["entries"] if "/" not in str(e) and str(e) not in ("", ".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


class Outputs:
    """The outputs of one command (see the module docstring for the rules)."""

    def __init__(self, command: str, force: bool = False):
        self.command, self.force = command, force
        self.files: dict[Path, str] = {}
        self.folders: dict[Path, str] = {}

    def file(self, path: Path, option: str) -> Path:
        """Declare an output file; refuse now what could not or may not be written at the end."""
        if path.is_dir():
            raise OutputError(f"{option} {path}: is a folder; give a file name")
        if path.exists() and not self.force:
            raise OutputError(f"{option} {path}: exists; pass --force to replace it")
        _check_writable(path, option)
        self.files[path] = option
        return path

    def folder(self, path: Path, option: str, names: tuple[str, ...] = ()) -> Path:
        """Declare an output folder: new or empty, or with --force one whose pmet-written files are replaced.
        `names`: entries the command will write there, checked now against files pmet did not write."""
        if path.exists() and not path.is_dir():
            raise OutputError(f"{option} {path}: is a file, not a folder")
        present = sorted(os.listdir(path)) if path.is_dir() else []
        if present and not self.force:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise OutputError(f"{option} {path}: folder is not empty ({shown}); give a new or empty folder, or pass "
                              "--force to replace what pmet wrote there (other files are kept)")
        _check_writable(path / "x", option)
        _check_collisions(path, names, option)
        self.folders[path] = option
        return path

    def write(self, writers: dict[Path, Callable[[Path], object]]) -> None:
        """Call each declared output's writer on a staging path, then move every output into place."""
        stages: dict[Path, Path] = {}
        dest = Path()
        try:
            for dest, write in writers.items():
                stages[dest] = self._stage(dest)
                write(stages[dest])
            for dest, stage in stages.items():
                if dest in self.folders:
                    _check_collisions(dest, os.listdir(stage), self.folders[dest])
            for dest, stage in stages.items():
                self._commit(dest, stage)
        except OSError as e:
            option = self.files.get(dest) or self.folders.get(dest, "output")
            raise OutputError(f"{option} {dest}: cannot write: {e.strerror or e}") from None
        finally:
            for stage in stages.values():
                _remove(stage)

    def _stage(self, dest: Path) -> Path:
        if dest not in self.files and dest not in self.folders:
            raise ValueError(f"{dest} was not declared as an output")
        parent = dest.parent if dest in self.files or not dest.is_dir() else dest
        parent.mkdir(parents=True, exist_ok=True)
        if dest in self.files:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp")
            os.close(fd)
            return Path(tmp)
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name or 'out'}.stage-"))

    def _commit(self, dest: Path, stage: Path) -> None:
        mask = _umask()
        if dest in self.files:
            os.chmod(stage, 0o666 & ~mask)
            os.replace(stage, dest)
            return
        entries = sorted(os.listdir(stage))
        _ordinary_permissions(stage, mask)
        if not dest.exists():
            _write_manifest(stage, self.command, entries)
            os.replace(stage, dest)
            return
        for old in owned_entries(dest):
            _remove(dest / old)
        for name in entries:
            os.replace(stage / name, dest / name)
        _write_manifest(dest, self.command, entries)


def _ordinary_permissions(folder: Path, mask: int) -> None:
    """Files 0o666 and folders 0o777 minus the umask (libraries' temp files and mkdtemp are owner-only)."""
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _check_collisions(dest: Path, names: Iterable[str], option: str) -> None:
    if not dest.is_dir():
        return
    ours = owned_entries(dest)
    clash = sorted(n for n in names if (dest / n).exists() and n not in ours)
    if clash:
        raise OutputError(f"{option} {dest}: would replace {', '.join(clash)}, which pmet did not write there; "
                          f"move it or choose another folder")


def _write_manifest(folder: Path, command: str, entries: list[str]) -> None:
    atomic_write(folder / MANIFEST, json_writer({"written_by": command, "entries": entries}))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
