"""The Dockerfiles and the CI workflow, checked where Docker and GitHub Actions do not run (as here): every file a
build copies exists, every script it runs exists and finds what it names inside the image, and CI runs the suite the
way ``.ci/run`` does. The images themselves are build-checked where Docker runs (docs/testing.md)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: comments dropped, ``\\`` continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name}: a continuation runs off the end"
    return out


def copy_sources(steps: list[tuple[str, str]]) -> list[str]:
    sources = []
    for keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            assert len(words) >= 2, f"{keyword} {args}: needs a source and a destination"
            sources += words[:-1]
    return sources


def scripts_run(command: str) -> list[str]:
    """Repository scripts a RUN line executes (``bash X.sh``, ``python X.py``, ``./X``)."""
    words = shlex.split(command.replace("&&", " ; ").replace(";", " ; "))
    found = []
    for i, word in enumerate(words):
        after_interpreter = i > 0 and Path(words[i - 1]).name in ("bash", "sh", "python", "python3")
        if (after_interpreter and not word.startswith("-")) or word.startswith("./") or word.endswith((".sh", ".py")):
            found.append(word)
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_source_and_every_script_run_exists(name):
    steps = instructions(REPO / name)
    assert steps[0][0] in ("FROM", "ARG") and any(k == "FROM" for k, _ in steps), f"{name}: no FROM"
    for source in copy_sources(steps):
        assert list(REPO.glob(source)), f"{name}: COPY source {source} is not in the repository"
    run = [script for keyword, args in steps if keyword == "RUN" for script in scripts_run(args)]
    assert "scripts/demo.sh" in run, f"{name}: the build must run the demo"
    for script in run:
        assert (REPO / script).is_file(), f"{name}: RUN calls {script}, which does not exist"
    cmd = next(args for keyword, args in reversed(steps) if keyword == "CMD")
    assert json.loads(cmd)[0] == "rlft"  # exec form; the console script comes from the image's .venv on PATH


@pytest.mark.parametrize("name", DOCKERFILES)
def test_what_the_scripts_run_in_the_build_need_was_copied_into_the_image(name):
    steps = instructions(REPO / name)
    copied = [Path(s) for s in copy_sources(steps)]

    def in_image(path: str) -> bool:
        return any(Path(path) == c or c in Path(path).parents for c in copied)

    # pip install -e . reads pyproject.toml and the readme it names (a regex: tomllib needs Python 3.11)
    readme = re.search(r'^readme = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert in_image("pyproject.toml") and in_image(readme)
    pending = [s for keyword, args in steps if keyword == "RUN" for s in scripts_run(args)]
    seen = set()
    while pending:  # the scripts, the scripts they call, and the configs and data files they name
        script = pending.pop()
        if script in seen:
            continue
        seen.add(script)
        assert in_image(script), f"{name}: the build runs {script}, which is not copied"
        text = (REPO / script).read_text()
        for path in re.findall(r"(?<![\w/.])((?:scripts|configs|rlft)/[\w./-]+\.(?:sh|py|yaml|jsonl))", text):
            assert (REPO / path).is_file() and in_image(path), f"{name}: {script} needs {path}"
            if path.endswith(".sh"):
                pending.append(path)
    config = yaml.safe_load((REPO / "configs/sft/smollm2_lora.yaml").read_text())  # the demo's training data
    assert in_image(config["data"]["init_args"]["path"])
    args = {a.split("=")[0] for k, a in steps if k == "ARG"}
    setup = (REPO / "scripts/setup_env.sh").read_text()
    assert "RLFT_TORCH_SPEC" in args and "RLFT_TORCH_SPEC" in setup  # the torch build the image asks for is read


def test_ci_runs_the_test_script_with_its_services_on_python_3_11():
    workflow = yaml.safe_load((REPO / ".github/workflows/ci.yml").read_text())
    job = workflow["jobs"]["test"]
    assert job["runs-on"].startswith("ubuntu") and job["container"]["image"].startswith("python:3.11")
    commands = [step.get("run", "") for step in job["steps"]]
    assert any("bash scripts/services.sh" in c and "GITHUB_ENV" in c for c in commands)
    assert commands[-1] == "bash scripts/test.sh"
    for script in ("scripts/services.sh", "scripts/test.sh"):
        assert (REPO / script).is_file()
        assert script.split("/")[-1] in (REPO / ".ci/run").read_text()  # the same steps as the CI entry point
    # services.sh runs as root with apt-get: what the Debian container gives
    assert "apt-get" in (REPO / "scripts/services.sh").read_text() and "bookworm" in job["container"]["image"]
