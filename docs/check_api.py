"""Check that the API reference documents every public name of `jpc` exactly once.

Compares the names exported by `jpc/__init__.py` (read with `ast`, so nothing is
imported) with the `::: jpc.<name>` entries of `docs/api/*.md`. Exits with status 1
and lists the differences when a name is missing, documented twice, documented but
not exported, rendered with `:::` on a page outside `docs/api/` (each object must
have one home, or cross-references become ambiguous), or defined without a docstring
(its API entry would be empty).

Run from anywhere: `python docs/check_api.py`.
"""

import ast
import collections
import pathlib
import re
import sys


ROOT = pathlib.Path(__file__).resolve().parent.parent
INIT = ROOT / "jpc" / "__init__.py"
DOCS_DIR = ROOT / "docs"
API_DIR = DOCS_DIR / "api"
ENTRY = re.compile(r"^:::\s+jpc\.([A-Za-z_][A-Za-z0-9_]*)\s*$")


def exported_names(init_file: pathlib.Path) -> set[str]:
    """Public names bound at the top level of `jpc/__init__.py`."""
    names = set()
    for node in ast.parse(init_file.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return {name for name in names if not name.startswith("_")}


def undocumented_names(init_file: pathlib.Path) -> list[str]:
    """Exported functions and classes whose definition has no docstring."""
    missing = []
    for node in ast.parse(init_file.read_text()).body:
        if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module):
            continue
        module = init_file.parent.joinpath(*node.module.split("."))
        defs = {
            d.name: d
            for d in ast.parse(module.with_suffix(".py").read_text()).body
            if isinstance(d, (ast.FunctionDef, ast.ClassDef))
        }
        for alias in node.names:
            public = alias.asname or alias.name
            found = defs.get(alias.name)
            if found is not None and not public.startswith("_"):
                if not (ast.get_docstring(found) or "").strip():
                    missing.append(public)
    return sorted(missing)


def documented_names(pages: list[pathlib.Path]) -> dict[str, list[str]]:
    """`::: jpc.<name>` entries of `pages`, mapped to the pages they are on."""
    found = collections.defaultdict(list)
    for page in pages:
        for line in page.read_text().splitlines():
            match = ENTRY.match(line.strip())
            if match:
                found[match.group(1)].append(str(page.relative_to(DOCS_DIR)))
    return found


def main() -> int:
    exported = exported_names(INIT)
    documented = documented_names(sorted(API_DIR.glob("*.md")))
    elsewhere = documented_names(
        [p for p in sorted(DOCS_DIR.rglob("*.md")) if API_DIR not in p.parents]
    )
    missing = sorted(exported - documented.keys())
    extra = sorted(documented.keys() - exported)
    twice = sorted(name for name, pages in documented.items() if len(pages) > 1)
    for name in missing:
        print(f"missing from docs/api: jpc.{name}")
    for name in extra:
        print(f"documented but not exported by jpc: jpc.{name} ({documented[name]})")
    for name in twice:
        print(f"documented more than once: jpc.{name} ({documented[name]})")
    for name, pages in sorted(elsewhere.items()):
        print(f"`::: jpc.{name}` outside docs/api (link to it instead): {pages}")
    no_docstring = undocumented_names(INIT)
    for name in no_docstring:
        print(f"no docstring: jpc.{name}")
    if missing or extra or twice or elsewhere or no_docstring:
        return 1
    print(f"docs/api documents all {len(exported)} public names of jpc exactly once.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
