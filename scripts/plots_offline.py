"""`dvc plots show` that renders offline, and a headless-Chromium check that it did.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without the internet the
training curves are blank. This script writes an HTML template that inlines the three libraries
from the pinned PyPI package ``vl-convert-python`` (``vl_convert.javascript_bundle``, Vega-Lite
5.x: DVC's plot specs are Vega-Lite v5) and runs ``dvc plots show --html-template`` with it.

    .venv/bin/python scripts/plots_offline.py       # -> dvc_plots/index.html, opens with no network
    python scripts/plots_offline.py --check         # + render it in headless Chromium with every
                                                    #   host unresolvable; fails unless each Vega plot
                                                    #   drew; screenshot in dvc_plots/screenshot.png
    python scripts/plots_offline.py --check-only PAGE.html   # check any page the same way

Extra arguments after ``--`` go to ``dvc plots show`` (e.g. ``-- plots/train/joint.csv``).
Run by an interpreter that lacks the project's packages (``python3 scripts/plots_offline.py``),
it runs itself again with the project's ``.venv/bin/python`` when there is one.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VEGA_LITE = "5.21"  # the newest 5.x vl-convert-python 1.9 ships; DVC's templates are Vega-Lite v5
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot (offline)</title>
    <script>
/* Vega, Vega-Lite %s and Vega-Embed, inlined from vl-convert-python %s */
%s
    </script>
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_NETWORK = "--host-resolver-rules=MAP * ~NOTFOUND"  # every host name fails to resolve
VENV = Path(__file__).resolve().parents[1] / ".venv"


def in_project_python() -> None:
    """Make sure the project's packages (vl-convert-python, DVC) are importable: if they are not,
    run this script again with ``.venv/bin/python`` (``exec``, same arguments); without a venv,
    exit naming the command that works. Then the offline, no-telemetry environment defaults."""
    try:
        import dvc  # noqa: F401
        import vl_convert  # noqa: F401
    except ImportError as err:
        python = VENV / "bin" / "python"
        if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit(f"{err.name} is not importable by {sys.executable}: run `make install` in the project, "
                 "then `.venv/bin/python scripts/plots_offline.py`")
    from crossalign import offline_defaults

    offline_defaults()


def template() -> str:
    """The page template with the Vega libraries inlined (no ``{scripts}``: nothing from a CDN)."""
    import vl_convert
    from importlib.metadata import version

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle.lower():
        raise RuntimeError("the Vega bundle contains '</script': it cannot be inlined in a <script> element")
    return TEMPLATE % (VEGA_LITE, version("vl-convert-python"), bundle)


def render(out: Path, dvc_args: list[str]) -> Path:
    """``dvc plots show`` with the offline template -> the page written."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "offline.html"
        path.write_text(template())
        cmd = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(path), "-o", str(out), *dvc_args]
        subprocess.run(cmd, check=True)
    page = out / "index.html"
    if not page.exists():
        sys.exit(f"dvc plots show wrote no {page}")
    return page


def chromium() -> str | None:
    return next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)


def check(page: Path, screenshot: Path | None = None) -> tuple[int, int]:
    """Open ``page`` in headless Chromium with no network -> (Vega plots on the page, plots drawn).

    A plot counts as drawn when Vega-Embed turned its div into a ``vega-embed`` element holding
    a canvas or an SVG."""
    browser = chromium()
    if browser is None:
        sys.exit("no chromium on PATH (apt-get install chromium)")
    html = page.read_text()
    expected = len(re.findall(r"vegaEmbed\(", html))
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", NO_NETWORK,
            "--virtual-time-budget=15000"]
    dom = subprocess.run([*base, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    drawn = len(re.findall(r'class="vega-embed[^"]*"[^>]*>\s*(?:<[^>]+>\s*)*?<(?:canvas|svg)', dom))
    if screenshot is not None:
        subprocess.run([*base, "--hide-scrollbars", "--window-size=1400,1800", f"--screenshot={screenshot}",
                        page.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    return expected, drawn


def main(argv: list[str] | None = None) -> int:
    in_project_python()
    argv = list(sys.argv[1:] if argv is None else argv)
    dvc_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("dvc_plots"), help="output folder (default dvc_plots)")
    parser.add_argument("--check", action="store_true", help="render in headless Chromium, offline, and verify")
    parser.add_argument("--check-only", type=Path, metavar="PAGE", help="only check an existing page")
    args = parser.parse_args(argv)
    if args.check_only:
        page, shot = args.check_only, None
    else:
        page = render(args.out, dvc_args)
        print(f"offline page: {page}")
        if not args.check:
            return 0
        shot = args.out / "screenshot.png"
    expected, drawn = check(page, shot)
    print(f"{drawn} of {expected} Vega plots drawn with no network" + (f"; screenshot {shot}" if shot else ""))
    return 0 if expected and drawn == expected else 1


if __name__ == "__main__":
    sys.exit(main())
