"""MkDocs hook: the settings reference page, generated from the settings dataclasses so it cannot drift.

`docs/reference/settings.md` holds a marker line; `on_page_markdown` replaces it with one section per settings
group (`RunSettings.groups()`, titled as in `deer-fed --help`): each field's flag, Flower run-config key, type,
default, choices and help. The settings are loaded through `peft_deer/light_import.py` from this checkout, so
the build needs no torch. `render(root)` is what the tests check against the real parser.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

MARKER = "<!-- settings-reference -->"
PAGE = "reference/settings.md"


def load_settings(root: Path) -> ModuleType:
    """`peft_deer.settings` of the checkout at `root`, without importing the `peft_deer` package (torch)."""
    spec = importlib.util.spec_from_file_location("_docs_light_import", root / "peft_deer" / "light_import.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"{root}/peft_deer/light_import.py not found")
    light = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(light)
    return light.load("peft_deer.defaults", "peft_deer.settings")


def _cell(value: Any) -> str:
    text = " ".join(str(value).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple):
        return "`" + " ".join(map(str, value)) + "`" if value else "none"
    return f"`{value}`"


def render(root: Path) -> str:
    """The reference's Markdown: one section per settings group, one table row per flag."""
    settings = load_settings(root)
    cli = settings.cli
    values = settings.values
    parts = [
        "`--config FILE.yaml` (or JSON) gives any of these as keys (`num-clients` or `num_clients`); the command "
        "line wins. A Flower run config uses the same keys (`--run-config \"num-clients=4\"`), read through the "
        "same fields and checks (`peft_deer.settings.from_mapping`).\n"
    ]
    for attr, group in settings.RunSettings.groups().items():
        title = cli.GROUP_TITLES[attr]
        doc = inspect.getdoc(group) or ""
        parts.append(f"## {title}\n\n`RunSettings.{attr}`: `{group.__name__}`. {_cell(doc.split(chr(10) * 2)[0])}\n")
        parts.append("| flag | Flower key | type | default | help |\n|---|---|---|---|---|")
        for kind in values.field_kinds(group):
            flag = "--" + kind.name.replace("_", "-")
            typ = {"bool": "switch", "names": "names…"}.get(kind.kind, kind.kind)
            if kind.choices is not None:
                typ = " \\| ".join(f"`{c}`" for c in kind.choices)
            key = kind.name.replace("_", "-")
            parts.append(f"| `{flag}` | `{key}` | {typ} | {_default(kind.default)} | {_cell(kind.help)} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its marker line {MARKER}")
    root = Path(config["config_file_path"]).resolve().parent
    return markdown.replace(MARKER, render(root))


__all__ = ["MARKER", "PAGE", "load_settings", "on_page_markdown", "render"]
