"""Sphinx configuration: the API reference, generated from the docstrings.

autodoc imports the installed package (``pip install '.[docs]'``: the C
extension must be built), so nothing here touches ``sys.path``.  The build
needs no network: no intersphinx, only the theme that ships with Sphinx.
"""

from __future__ import annotations

import argparse
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import unixsrv
from unixsrv import cli

project = "unixsrv"
author = "unixsrv developers"
copyright = "unixsrv developers"
release = unixsrv.__version__
version = release

extensions = ["sphinx.ext.autodoc"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"
html_theme_options = {
    "description": "A production Unix domain socket server for Python",
    "github_user": "unixsrv",
    "github_repo": "unixsrv",
}


class CommandHelp(SphinxDirective):
    """``.. command-help:: [SUBCOMMAND]``: the ``unixsrv`` command's own
    ``--help`` text (argparse), so the page cannot drift from the parser."""

    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        parser = cli._build_parser()
        if self.arguments:
            parser = _subparser(parser, self.arguments[0])
        text = parser.format_help()
        return [nodes.literal_block(text, text, language="text")]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise ValueError(f"the unixsrv command has no subcommand {name!r}")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("command-help", CommandHelp)
    return {"parallel_read_safe": True}
