"""Sphinx configuration of pnode_dist's documentation (`make docs` -> docs/_build/html)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

project = "pnode_dist"
author = "the pnode_dist developers"
copyright = "2026, " + author
_argv, sys.argv = sys.argv, sys.argv[:1]   # PETSc reads the command line at import: not Sphinx's
import pnode_dist.parallel  # noqa: E402  (starts PETSc; the API pages come from the docstrings)
sys.argv = _argv
release = version = pnode_dist.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated/*.txt"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False

html_theme = "alabaster"
html_title = "pnode_dist " + release
html_theme_options = {"description": "Distributed, reverse-accurate neural ODEs on PETSc",
                      "fixed_sidebar": True}
html_static_path = []


def _cli_help():
    """Write `pnode-inspect --help` for the command-line page (docs/cli.md includes it)."""
    out = os.path.join(ROOT, "docs", "_generated")
    os.makedirs(out, exist_ok=True)
    text = subprocess.run([sys.executable, "-m", "pnode_dist.inspect", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    text = text.replace("usage: inspect.py", "usage: pnode-inspect").replace(
        "usage: __main__.py", "usage: pnode-inspect")
    with open(os.path.join(out, "pnode-inspect-help.txt"), "w") as f:
        f.write(text)


_cli_help()
