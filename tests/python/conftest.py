"""Fixtures every Python test module shares.

`example_packs` exports each example pack once per test run (through the CLI,
as a user does) and hands out task folders that link to them, so a module
that serves only qwen2 sees only qwen2. The shared packs must not be changed:
a test that edits a pack copies it first (`shutil.copytree`). At the end of
the run every shared pack file is checked against its digest at export, and
a test that wrote into one fails the run.
"""
import hashlib
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))


def _digest(folder: pathlib.Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


class ExamplePacks:
    """Example packs exported on first use, keyed by example and export options."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.exported = {}  # (example, options) -> (folder, digest)
        self.folders = 0

    def pack(self, example: str, *options: str) -> pathlib.Path:
        """The folder of one exported pack (examples/models/EXAMPLE.py:build)."""
        key = (example, tuple(options))
        if key not in self.exported:
            out = self.root / "exports" / f"{example}-{len(self.exported)}"
            res = subprocess.run([FMX, "export", f"examples/models/{example}.py:build", "-o", out,
                                  "--quiet", *options], cwd=ROOT, capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, timeout=300)
            assert res.returncode == 0, res.stderr
            self.exported[key] = (out, _digest(out))
        return self.exported[key][0]

    def tasks(self, *examples: str, **named) -> pathlib.Path:
        """A new task folder (for --tasks) holding the given examples under
        their own names, and NAME=(example, *options) under NAME."""
        self.folders += 1
        folder = self.root / f"tasks-{self.folders}"
        folder.mkdir(parents=True)
        wanted = {ex: (ex,) for ex in examples}
        wanted.update(named)
        for name, (example, *options) in wanted.items():
            (folder / name).symlink_to(self.pack(example, *options), target_is_directory=True)
        return folder

    def check_unchanged(self) -> None:
        for (example, options), (folder, digest) in self.exported.items():
            assert _digest(folder) == digest, (
                f"a test changed the shared pack {example} {' '.join(options)} ({folder}): "
                "copy a pack before editing it")


@pytest.fixture(scope="session")
def example_packs(tmp_path_factory):
    packs = ExamplePacks(tmp_path_factory.mktemp("example-packs"))
    yield packs
    packs.check_unchanged()
