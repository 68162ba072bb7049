"""Provenance of exported checkpoints: `manifest.json` beside the weights holds the sha256 of every file, the
config, the command and the sobre version / git commit that wrote them; `sobre verify DIR` checks it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

NAME = "manifest.json"


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    """The commit of the sobre source tree, with '+dirty' when it has uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(folder: Path) -> dict:
    """Hash every file of the folder (but the manifest) and write manifest.json."""
    from . import __version__
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != NAME}
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else None
    m = {"sobre_version": __version__, "git_commit": git_commit(), "command": " ".join(sys.argv),
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config, "files": files}
    (folder / NAME).write_text(json.dumps(m, indent=2) + "\n")
    return m


def verify(folder: Path) -> list[str]:
    """Problems found (empty: every file is as the manifest says): changed, missing or added files."""
    folder = Path(folder)
    if not (folder / NAME).exists():
        raise FileNotFoundError(f"{folder}: no {NAME} (sobre writes one with every exported checkpoint)")
    try:
        m = json.loads((folder / NAME).read_text())
        files = m["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / NAME}: not a sobre manifest ({e})") from None
    problems = []
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"missing: {name}")
        elif p.stat().st_size != want["bytes"] or sha256(p) != want["sha256"]:
            problems.append(f"changed: {name} (sha256 differs from the manifest)")
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if p.is_file() and p.name != NAME and name not in files:
            problems.append(f"added: {name}")
    return problems
