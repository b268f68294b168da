"""The shape of the project as a user meets it: one import package installed, a module map that
names every module, and docs whose relative links all resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
        *sorted((REPO / "bench").glob("*.md")), *sorted((REPO / "ops").rglob("*.md"))]


@pytest.mark.slow
@pytest.mark.deadline(300)
def test_a_plain_install_holds_one_import_package_and_the_console_script(tmp_path: Path) -> None:
    """``pip install .`` (not editable) puts exactly ``sessionbus`` in site-packages."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(REPO)],
        check=True, capture_output=True, text=True, timeout=240,
    )
    top = {p.name for p in target.iterdir()}
    dist_info = {n for n in top if n.endswith(".dist-info")}
    assert top - dist_info == {"sessionbus", "bin"}, sorted(top)
    assert (target / "bin" / "sessionbus").is_file()
    record = next(iter(dist_info))
    assert record.startswith("sessionbus-")
    # the promised folders are inside the one package
    for sub in ("schemas", "producer", "consumer", "bus", "keys", "servers", "cli"):
        assert (target / "sessionbus" / sub / "__init__.py").is_file(), sub
    env = {**os.environ, "PYTHONPATH": str(target)}
    # -I: the checkout (the working directory) is not on the path, only the install
    gone = subprocess.run([sys.executable, "-I", "-c",
                           f"import sys; sys.path.insert(0, {str(target)!r}); import schemas"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr
    here = subprocess.run([sys.executable, "-I", "-c",
                           f"import sys; sys.path.insert(0, {str(target)!r}); "
                           "import sessionbus.schemas.events as e; print(e.__file__)"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert here.returncode == 0, here.stderr
    assert here.stdout.strip().startswith(str(target))


def product_modules() -> list[str]:
    """Every module of the installed package, as a dotted name (the symlinked folders once)."""
    names = []
    for root, package in (("sessionbus", "sessionbus"), ("schemas", "sessionbus.schemas"),
                          ("producer", "sessionbus.producer"), ("consumer", "sessionbus.consumer")):
        base = REPO / root
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if rel.parts[0] in ("schemas", "producer", "consumer") and root == "sessionbus":
                continue  # links to the top-level folders, counted there
            if path.name == "__init__.py" and path.stat().st_size == 0:
                continue
            parts = [*rel.parent.parts, path.stem] if path.name != "__init__.py" else [
                *rel.parent.parts]
            names.append(".".join([package, *parts]) if parts else package)
    return names


def test_architecture_names_every_module() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = [m for m in product_modules() if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_docs_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # absolute URLs and in-page anchors
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken
    assert len(DOCS) >= 5


def test_no_doc_points_into_shared() -> None:
    """shared/ is not part of the repository: nothing a reader gets may depend on it."""
    for doc in DOCS:
        text = doc.read_text()
        assert "shared/" not in text and "DESIGN.md" not in text, doc
