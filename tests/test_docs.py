"""The README and docs/ as a newcomer meets them: short pages, every page reachable from the README,
every link resolving, and every command in a ```bash block accounted for by a test.

Each command line of every ```bash block (README.md and docs/*.md) must be listed in
:data:`RUN_AS_WRITTEN` (``tests/test_dayone.py`` runs it, as written, in a clone after ``make run``,
with a PATH that lacks ``.venv/bin``), in :data:`SERVED` (a long-running server: the test starts it as
written and stops it), or in :data:`ELSEWHERE` with the reason it cannot run here (placeholders for
other hosts, a GPU, the network). A new command in the docs fails this test until it is placed.
"""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

PAGES = sorted((REPO / "docs").glob("*.md"))
README = REPO / "README.md"

# run in the day-one clone by tests/test_dayone.py, exactly as written (prefix of the line up to its comment)
RUN_AS_WRITTEN = (
    ".venv/bin/crossalign check && .venv/bin/dvc repro",
    ".venv/bin/dvc metrics show",
    ".venv/bin/dvc plots show",
    ".venv/bin/python scripts/plots_offline.py",
    '.venv/bin/crossalign search "a red circle left of a blue square" --top 5',
    '.venv/bin/crossalign search --image "$(ls data/raw/synthetic/images/test/*.png | head -1)" --top 5',
    ".venv/bin/python -m flows.compare",
)
# servers: test_dayone starts each as written, waits for it to answer, stops it
SERVED = (
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db",
    ".venv/bin/prefect server start",
)
# not runnable on one offline CPU machine, and why; each one's mechanism is tested elsewhere
ELSEWHERE = {
    ".venv/bin/dvc exp run -n coco-gpu": "downloads COCO and wants a GPU (tests/test_overlay.py applies the overlay)",
    ".venv/bin/dvc exp show": "follows the COCO experiment above",
    ".venv/bin/dvc exp run -n real": "needs a folder of real photos in data.folder (tests/test_overlay.py applies the "
                                     "overlay; bench/real_val.py trains with it)",
    ".venv/bin/dvc exp run -n lit-gpu": "trains three MiniLM layers per method, for a GPU (tests/test_overlay.py applies the "
                                        "overlay; tests/test_text_layers.py trains the layers on the CPU)",
    ".venv/bin/dvc exp run -n verdict": "hours of training on the 2-core CPU (tests/test_overlay.py applies the overlay)",
    "export ": "sets a variable for the commands after it",
    "curl ": "talks to a tracking server on another host (tests/test_tracking_server.py does it on loopback)",
    "-H 'Content-Type": "continuation of the curl line",
    ".venv/bin/crossalign mlflow-server": "PostgreSQL and S3 of another host (tests/servers.py starts it on loopback)",
    "--backend-store-uri postgresql": "continuation of the mlflow-server line",
    "--artifacts-destination s3": "continuation of the mlflow-server line",
    "--allowed-hosts": "continuation of the mlflow-server line",
    ".venv/bin/python -m flows.serve": "serves a deployment forever (tests/test_flows_server.py serves it and runs it)",
    ".venv/bin/prefect deployment run": "needs the served deployment above (tests/test_flows_server.py)",
    ".venv/bin/prefect work-pool create": "a work pool of a long-lived server (tests/test_multihost.py)",
    ".venv/bin/prefect worker start": "a worker of a long-lived server (tests/test_multihost.py)",
    ".venv/bin/prefect server start --host 0.0.0.0": "the shared server of several hosts (tests/test_multihost.py)",
    ".venv/bin/prefect --no-prompt deploy": "deploys to a long-lived server (tests/test_flows_server.py, test_multihost.py)",
    ".venv/bin/dvc remote add -d shared s3://": "an S3 remote (tests/test_multihost.py uses a local one)",
    "cd ~/crossalign-gpu0": "a GPU host's clone (tests/test_multihost.py: two clones as hosts)",
    ".venv/bin/python -m flows.compare --dispatch": "needs GPU workers (tests/test_multihost.py)",
    "make run": "the command test_dayone's clone starts with",
    "make test": "this suite",
}


def command_lines(path: Path) -> list[str]:
    """The lines of every ```bash block of ``path``, comments and blank lines dropped."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = line.strip() == "```bash" if not inside else False
            continue
        if inside and line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    return lines


def command(line: str) -> str:
    """A command line without its trailing comment (``  # ...``)."""
    return re.split(r"\s{2,}#\s", line, maxsplit=1)[0].strip()


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert PAGES, "docs/ has no pages"
    for page in PAGES:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"
        assert len(page.read_text().splitlines()) <= 400, page.name


def test_relative_links_resolve():
    for page in [README, *PAGES]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links {target}: no such file"


def test_every_documented_command_is_run_by_a_test_or_says_why_not():
    unplaced = []
    for page in [README, *PAGES]:
        for line in command_lines(page):
            cmd = command(line)
            if cmd in RUN_AS_WRITTEN or cmd in SERVED or any(cmd.startswith(k) for k in ELSEWHERE):
                continue
            unplaced.append(f"{page.relative_to(REPO)}: {cmd}")
    assert not unplaced, "commands no test runs and no reason given:\n" + "\n".join(unplaced)


def test_commands_name_the_venv_binaries():
    """A shell that never activated the venv finds no `dvc`, `prefect`, `crossalign` or `python`
    with the project's packages: every documented command names `.venv/bin/...`."""
    bare = re.compile(r"(^|&& |\$\()(dvc|prefect|crossalign|python|mlflow) ")
    for page in [README, *PAGES]:
        for line in command_lines(page):
            assert not bare.search(command(line)), f"{page.relative_to(REPO)}: {line}"
