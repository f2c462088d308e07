"""Reading the YAML files admins write (config, rule files) within fixed bounds.

Both are edited by hand and copied from the internet, so reading one must not be able
to take the daemon down: a file is at most MAX_FILE_BYTES, and its aliases may expand
to at most MAX_NODES nodes (a "billion laughs" file of a few lines would otherwise
expand to gigabytes in any walk over it).  Errors name the file and line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

MAX_FILE_BYTES = 1 << 20  # a config or rule file: real ones are a few KB
MAX_NODES = 100_000  # nodes after alias expansion


class YamlFileError(ValueError):
    """A YAML file that cannot be used; the message names the file and line."""


def read_text(path: Path) -> str:
    """The file's text; YamlFileError naming the line of a byte that is not UTF-8.

    OSError (missing, unreadable) is left to the caller, which knows what it means.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise YamlFileError(f"{path}: larger than {MAX_FILE_BYTES >> 10} KB: not read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise YamlFileError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at "
                            f"column {column}): save the file as UTF-8") from None


# libyaml's parser where python3-yaml was built with it (Debian's is): the same nodes and
# marks, ten times faster than the pure-Python one (rule files load at every start).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def compose(text: str, file: str) -> yaml.Node | None:
    """The YAML node tree of ``text``, refused if its aliases expand past MAX_NODES."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlFileError(f"{file}: larger than {MAX_FILE_BYTES >> 10} KB: not read")
    root = yaml.compose(text, Loader=SAFE_LOADER)
    if root is not None and _expanded_size(root) > MAX_NODES:
        raise YamlFileError(f"{file}: its aliases expand to more than {MAX_NODES:,} nodes "
                            "(an alias bomb?): refused")
    return root


def syntax_error(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """The line where the parser gave up (None if it did not say) and why, in one line:
    the problem, and what it was parsing when that started (libyaml's own text is
    several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    return (mark.line + 1 if mark is not None else None), problem


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the tree with every alias expanded, counted without expanding: a shared
    node's size is computed once (children before parents, by an explicit stack)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done:
            sizes[id(node)] = min(MAX_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def key_lines(node: yaml.Node | None, prefix: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every dotted key and list item under ``node``."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out.setdefault(key, key_node.start_mark.line + 1)
            key_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}[{i}]"
            out.setdefault(key, item.start_mark.line + 1)
            key_lines(item, key, out)
