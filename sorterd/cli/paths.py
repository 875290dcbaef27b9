"""Output paths checked before anything starts.

A run writes its batch folder, its summary, a recorded session and a decisions
file; `sorterd calibrate` writes a profile.  A path that cannot be written must
stop the command before the model loads, the machine calibrates or a stone is
fed -- not after the batch has been sorted -- and the message says which path
(the flag or config key that named it) and why.  Nothing is created here: the
check asks the file system only, so a refused command leaves no trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Output:
    """One path a command will write: `label` is the flag or key that named it (for the message)."""

    label: str
    path: Path
    kind: str  # "dir" (created if missing) or "file" (its parent created if missing)


class OutputPathError(ValueError):
    """Paths a command cannot write to, every one of them with the reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    def report(self, command: str) -> str:
        return f"sorterd {command}: cannot write the outputs:\n" + "\n".join(f"  - {p}" for p in self.problems)


def check_outputs(outputs: list[Output]) -> None:
    """Raise OutputPathError naming every output that cannot be written."""
    problems = []
    for out in outputs:
        why = dir_problem(out.path) if out.kind == "dir" else file_problem(out.path)
        if why is not None:
            problems.append(f"{out.label} {str(out.path)!r}: {why}")
    if problems:
        raise OutputPathError(problems)


def dir_problem(path: Path) -> str | None:
    """Why a directory cannot be used for writing (or created), or None."""
    p = path.expanduser()
    if p.exists():
        if not p.is_dir():
            return "exists and is not a directory"
        return None if _writable(p) else "is a directory this user cannot write to"
    return _creation_problem(p)


def file_problem(path: Path) -> str | None:
    """Why a file cannot be written there (its parent created if missing), or None."""
    p = path.expanduser()
    if p.is_dir():
        return "is a directory: give a file name"
    if p.exists():
        return None if os.access(p, os.W_OK) else "exists and this user cannot write to it"
    parent = p.parent
    if parent.exists():
        if not parent.is_dir():
            return f"its folder {str(parent)!r} is a file, not a directory"
        return None if _writable(parent) else f"its folder {str(parent)!r} is not writable by this user"
    return _creation_problem(parent)


def _creation_problem(missing: Path) -> str | None:
    """`missing` does not exist: can it be created (mkdir -p)?  Decided by its nearest existing ancestor."""
    ancestor = missing.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {str(ancestor)!r} is a file, not a directory"
    if not _writable(ancestor):
        return f"cannot be created: {str(ancestor)!r} is not writable by this user"
    return None


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)
