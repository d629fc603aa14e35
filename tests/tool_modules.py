"""The scripts of tools/ as modules, for the tests that call their functions."""

import importlib
import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def import_tool(name: str):
    """tools/<name>.py imported as a module (tools/ on sys.path only while it and its sibling imports load)."""
    sys.path.insert(0, TOOLS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
