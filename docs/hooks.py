"""MkDocs hooks: link the example notebooks that exist under `docs/examples/`.

The notebooks are written separately from the pages, so instead of a fixed list,
the "Examples" section of the nav, every `<!-- examples-list -->` marker (a list of
all notebooks) and every `<!-- example: NAME -->` marker (a link to one notebook, or
nothing) are filled from the `examples/*.ipynb` files of the build's file collection,
so nav, links and pages always agree. Known notebooks come in the order below, any
others after them, alphabetically. With no notebook the section is dropped, so the
strict build never points at a missing file.
"""

import posixpath
import re


EXAMPLES = {
    "pc_from_scratch": "PC from scratch",
    "discriminative_pc": "Discriminative PC on MNIST",
    "generative_pc": "Generative PC",
    "hybrid_pc": "Hybrid PC",
    "bidirectional_pc": "Bidirectional PC",
    "epc": "Error-based PC (ePC)",
    "mupc_resnet": "μPC on a deep residual network",
    "ipc_and_nudging": "Incremental PC and nudging",
    "zil": "Zero-divergence inference learning",
    "local_rules": "Local rules vs PC vs backprop",
    "linear_theory": "Theory of deep linear networks",
    "vit": "A vision transformer by PC and backprop",
    "bregman_pc": "Bregman PC on MNIST",
    "mcpc": "Monte Carlo PC: a generative model that samples",
}
MARKER = "<!-- examples-list -->"
ONE = re.compile(r"<!-- example: (\w+) -->")
SECTION = "Examples"
_found: list[tuple[str, str]] = []  # (title, path under docs/), set by on_files


def _notebooks(files) -> list[tuple[str, str]]:
    """`(title, path relative to docs/)` of every example notebook, in nav order."""
    found = {
        posixpath.splitext(posixpath.basename(f.src_uri))[0]
        for f in files
        if posixpath.dirname(f.src_uri) == "examples" and f.src_uri.endswith(".ipynb")
    }
    known = [name for name in EXAMPLES if name in found]
    others = sorted(found - set(EXAMPLES))
    titles = {**EXAMPLES, **{n: n.replace("_", " ").capitalize() for n in others}}
    return [(titles[name], f"examples/{name}.ipynb") for name in known + others]


def on_files(files, config):
    """Fill (or drop) the nav's "Examples" section from the collected files."""
    _found[:] = _notebooks(files)
    entries = [{title: path} for title, path in _found]
    nav = []
    for item in config["nav"] or []:
        if isinstance(item, dict) and SECTION in item:
            if entries:
                nav.append({SECTION: entries})
        else:
            nav.append(item)
    config["nav"] = nav
    return files


def on_page_markdown(markdown, page, config, files):
    """Replace the markers with links to the notebooks present."""
    here = posixpath.dirname(page.file.src_uri) or "."
    found = {path: title for title, path in _found}

    def link(name: str) -> str:
        path = f"examples/{name}.ipynb"
        if path not in found:
            return ""
        return f"Example notebook: [{found[path]}]({posixpath.relpath(path, here)})."

    markdown = ONE.sub(lambda m: link(m.group(1)), markdown)
    if MARKER not in markdown:
        return markdown
    links = [f"- [{title}]({posixpath.relpath(path, here)})" for title, path in _found]
    text = "\n".join(links) or "*(The example notebooks are not in this build.)*"
    return markdown.replace(MARKER, text)
