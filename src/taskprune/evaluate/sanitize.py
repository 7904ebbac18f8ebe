"""Turn a chat model's answer to a HumanEval/MBPP problem into a runnable program.

A chat model rarely returns bare code: it wraps it in markdown fences, adds prose, repeats the
function signature, appends example calls or an ``if __name__ == "__main__":`` block, or is cut off
mid-way. :func:`sanitize_code` reduces such an answer to the full text of a program that defines
the requested function and does nothing else when executed, ready to be followed by the test code.

The pipeline is:

1. :func:`extract_code` picks the code: the fenced block that defines the entry point (else the
   first code-looking block), or the raw text when there are no fences.
2. Unparsable parts (prose, a cut-off tail) are dropped by parsing the longest valid prefix of
   each chunk that starts like code.
3. Only imports, top-level ``def``/``class`` statements, ``try`` blocks made of imports, and the
   top-level assignments those definitions read survive.
4. The prompt is merged in: a body-only answer is appended to the prompt; an answer that defines
   the entry point itself gets the prompt's imports and any helper functions it does not redefine.
"""

from __future__ import annotations

import ast
import re
import textwrap
import tokenize
from dataclasses import dataclass

__all__ = [
    "CodeRegion",
    "extract_code",
    "find_function",
    "parsable_prefix",
    "sanitize_code",
    "sanitize_mbpp",
]

_FENCE = re.compile(r"^\s*```+\s*([\w+#.-]*)")
_PY_LANGS = frozenset({"", "python", "python3", "py", "py3", "pycon", "ipython"})
# A column-0 line that could begin a chunk of code (prose rarely parses, and is dropped anyway).
_CODE_START = re.compile(
    r"^(?:async\s+def\b|def\b|class\b|import\b|from\b|@|if\b|for\b|while\b|try\b|with\b"
    r"|[A-Za-z_][\w.]*\s*(?:=|\(|\[|:|\+=|-=|\*=))"
)
# How many cut points a prefix search tries before it only tries ends of top-level statements.
_MAX_PARSE_ATTEMPTS = 16
# How many code-looking lines may fail to start a parsable chunk before salvaging gives up.
_MAX_FAILED_STARTS = 32
_DEFINITION_START = re.compile(r"^(?:async\s+def|def|class|import|from)\b|^@")


@dataclass(frozen=True)
class CodeRegion:
    """The code part of a model answer.

    ``code`` is the selected fenced block (or the whole answer when it has no fences); ``fenced``
    says whether it came from a fence, and ``closed`` whether that fence was closed (a block cut
    off by the generation budget is not).
    """

    code: str
    fenced: bool
    closed: bool


def _fenced_blocks(text: str) -> list[tuple[str, str, bool]]:
    """Split ``text`` into markdown code blocks: ``(language, code, closed)`` in order."""
    blocks: list[tuple[str, str, bool]] = []
    lang: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if lang is None:
            if fence:
                lang, body = fence.group(1).lower(), []
        elif fence and not fence.group(1):
            blocks.append((lang, "\n".join(body) + "\n", True))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        if body and not text.endswith("\n"):
            body = body[:-1]  # cut off by the generation budget mid-line: the last line is partial
        blocks.append((lang, "\n".join(body) + ("\n" if body else ""), False))
    return blocks


def _defines_text(code: str, name: str) -> bool:
    """Cheap textual test that ``code`` contains ``def name(`` at some indentation."""
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(completion: str, entry_point: str | None = None) -> CodeRegion:
    """Select the code in a model answer.

    With markdown fences, the chosen block is the first one that defines ``entry_point`` (when
    given); otherwise the first Python (or untagged) block containing a ``def``/``class``, else
    the first Python block, else the first block. Without fences the whole answer is returned.

    A block whose closing fence never came was cut off by the generation budget; when the answer
    also does not end with a newline, its last line is partial and is left out.
    """
    blocks = _fenced_blocks(completion)
    if not blocks:
        return CodeRegion(completion, fenced=False, closed=False)
    python = [b for b in blocks if b[0] in _PY_LANGS] or blocks
    chosen = None
    if entry_point:
        chosen = next((b for b in python if _defines_text(b[1], entry_point)), None)
    if chosen is None:
        chosen = next((b for b in python if re.search(r"^\s*(?:def|class)\s", b[1], re.M)), None)
    if chosen is None:
        chosen = python[0]
    return CodeRegion(chosen[1], fenced=True, closed=chosen[2])


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes in source
        return None


def _statement_ends(lines: list[str]) -> list[int]:
    """Line counts ``n`` at which a logical line ends, so ``lines[:n]`` may parse.

    Found with the tokenizer, so lines inside an open bracket, a triple-quoted string or a
    backslash continuation are never candidates. Tokenizing stops at the first error: no prefix
    reaching past it can parse.
    """
    ends: list[int] = []
    readline = iter(line + "\n" for line in lines).__next__
    try:
        for token in tokenize.generate_tokens(readline):
            if token.type == tokenize.NEWLINE:
                ends.append(token.end[0])
    except (tokenize.TokenError, SyntaxError, StopIteration):
        pass
    return ends


def _longest_parsable_prefix(lines: list[str]) -> int:
    """Number of leading ``lines`` forming the longest prefix that parses to at least one statement.

    Candidate cut points are the ends of logical lines up to the line the parser reports an error
    on (nothing longer can parse). The last :data:`_MAX_PARSE_ATTEMPTS` of them are tried first,
    which finds a function cut off mid-body; after that only cuts followed by a column-0 line
    (ends of top-level statements) are tried, which bounds the work on pathological output while
    still keeping earlier complete definitions.
    """
    try:
        return len(lines) if ast.parse("\n".join(lines)).body else 0
    except SyntaxError as err:
        upper = min(len(lines), err.lineno or len(lines))
    except ValueError:  # null bytes
        upper = len(lines)
    ends = sorted(set(_statement_ends(lines[:upper])), reverse=True)
    next_indented = [False] * (len(lines) + 1)  # is the next non-blank line after n indented?
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        next_indented[i] = line[:1].isspace() if line.strip() else next_indented[i + 1]
    for rank, n in enumerate(ends):
        if rank >= _MAX_PARSE_ATTEMPTS and next_indented[n]:
            continue
        tree = _parse("\n".join(lines[:n]))
        if tree is not None and tree.body:
            return n
    return 0


def parsable_prefix(source: str) -> str:
    """The longest run of leading lines of ``source`` that parses to at least one statement.

    ``""`` when not even the first statement parses. See :func:`_longest_parsable_prefix` for how
    the cut points are searched.
    """
    lines = source.splitlines()
    return "\n".join(lines[: _longest_parsable_prefix(lines)])


def _salvage(code: str) -> str:
    """Keep the parsable chunks of ``code``: prose and a cut-off tail are dropped.

    Starting at each column-0 line that looks like code, the longest parsable run of lines is kept;
    scanning resumes after it (and gives up after :data:`_MAX_FAILED_STARTS` code-looking lines
    that start nothing parsable). The result always parses.
    """
    if _parse(code) is not None:
        return code
    lines = code.splitlines()
    kept: list[str] = []
    failed_starts = 0
    i = 0
    while i < len(lines) and failed_starts < _MAX_FAILED_STARTS:
        if _CODE_START.match(lines[i]):
            n = _longest_parsable_prefix(lines[i:])
            if n:
                kept.extend(lines[i : i + n])
                kept.append("")
                i += n
                continue
            failed_starts += 1
        i += 1
    return "\n".join(kept).strip("\n") + "\n" if kept else ""


def _node_start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", None) or []
    return min([node.lineno] + [d.lineno for d in decorators])


def _names(node: ast.AST, ctx: type | None = None) -> set[str]:
    return {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and (ctx is None or isinstance(n.ctx, ctx))
    }


def _free_names(node: ast.stmt) -> set[str]:
    """Names a definition reads from the enclosing module (approximate: loads minus local stores)."""
    loaded = _names(node, ast.Load)
    if isinstance(node, ast.ClassDef):
        return loaded
    local = _names(node, ast.Store) | {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
    declared_global = {g for n in ast.walk(node) if isinstance(n, ast.Global) for g in n.names}
    return (loaded - local) | declared_global


def _assigned_names(node: ast.stmt) -> set[str]:
    targets: list[ast.AST]
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    else:
        return set()
    return set().union(*(_names(t) for t in targets))


def _is_import_try(node: ast.stmt) -> bool:
    return isinstance(node, ast.Try) and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in node.body)


def _is_recursion_limit(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "setrecursionlimit"
    )


def _definitions_only(source: str) -> str:
    """Keep imports, definitions, and the module-level assignments the definitions read.

    Example calls, prints, asserts, loops and ``if __name__ == "__main__":`` blocks are dropped.
    ``source`` must parse.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    keep: list[ast.stmt] = []
    needed: set[str] = set()
    assignments: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            keep.append(node)
            needed |= _free_names(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) or _is_import_try(node):
            keep.append(node)
        elif _is_recursion_limit(node):
            keep.append(node)
        elif isinstance(node, (ast.Assign, ast.AugAssign)) or (
            isinstance(node, ast.AnnAssign) and node.value is not None
        ):
            assignments.append(node)
    changed = True
    while changed:
        changed = False
        for node in assignments:
            if node not in keep and _assigned_names(node) & needed:
                keep.append(node)
                needed |= _names(node, ast.Load)
                changed = True
    out: list[str] = []
    seen_imports: set[str] = set()
    previous_was_import = False
    for node in sorted(keep, key=_node_start):
        text = "\n".join(lines[_node_start(node) - 1 : node.end_lineno])
        is_import = isinstance(node, (ast.Import, ast.ImportFrom))
        if is_import:
            key = ast.dump(node)
            if key in seen_imports:
                continue
            seen_imports.add(key)
        if out:
            out.append("\n" if is_import and previous_was_import else "\n\n\n")
        out.append(text)
        previous_was_import = is_import
    return "".join(out) + "\n" if out else ""


def find_function(source: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The last top-level definition of function ``name`` in ``source`` (None if absent or unparsable)."""
    tree = _parse(source)
    if tree is None:
        return None
    found = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found = node
    return found


def _last_function_name(source: str) -> str | None:
    tree = _parse(_salvage(source))
    if tree is None:
        return None
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names[-1] if names else None


def _without_definitions(source: str, names: set[str]) -> str:
    """``source`` (which parses) minus its top-level defs/classes whose name is in ``names``."""
    tree = ast.parse(source)
    drop: set[int] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            drop.update(range(_node_start(node), node.end_lineno + 1))
    lines = source.splitlines()
    return "\n".join(line for i, line in enumerate(lines, start=1) if i not in drop)


def _top_level_names(source: str) -> set[str]:
    tree = _parse(source)
    if tree is None:
        return set()
    return {
        n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _first_code_line(code: str) -> str | None:
    return next((line for line in code.splitlines() if line.strip()), None)


def sanitize_code(completion: str, prompt: str = "", entry_point: str | None = None) -> str:
    """Return the full text of a runnable program built from a model's answer.

    ``prompt`` is the problem's code prompt (HumanEval: imports, helper functions and the target
    function's signature and docstring); ``entry_point`` is the target function's name, inferred
    as the prompt's last function when not given.

    * If the answer defines ``entry_point`` itself, the result is the prompt's imports, helper
      functions and needed constants that the answer does not redefine, followed by the answer's
      definitions.
    * If it gives only the body (indented lines continuing the prompt), the result is the prompt
      followed by that body. A body returned without indentation is indented by four spaces.
    * Otherwise (no prompt, or an answer without the entry point) the answer's definitions are
      returned, after the prompt's when there is one.

    In every case only imports, ``def``/``class`` statements, import-only ``try`` blocks,
    ``sys.setrecursionlimit`` calls and the module-level assignments that definitions read are
    kept. Unparsable text is dropped, so a cut-off answer yields the longest valid prefix of each
    code chunk. The result always compiles (it may be empty).
    """
    region = extract_code(completion, entry_point)
    if entry_point is None and prompt:
        entry_point = _last_function_name(prompt)
    code = region.code
    dedented = textwrap.dedent(code)
    answer = _salvage(dedented)
    if entry_point and find_function(answer, entry_point) is not None:
        return _merge_prompt(prompt, answer)
    if not prompt:
        return _definitions_only(answer)
    first = _first_code_line(code)
    if first is None:
        return _definitions_only(_salvage(prompt))
    if first[:1] in " \t":
        body = code
    elif _DEFINITION_START.match(first):
        return _merge_prompt(prompt, answer)
    else:
        body = textwrap.indent(dedented, "    ")
    program = prompt if prompt.endswith("\n") else prompt + "\n"
    return _definitions_only(_salvage(program + body))


def _merge_prompt(prompt: str, answer: str) -> str:
    """The prompt's imports/helpers not redefined by ``answer``, then ``answer``, filtered."""
    prompt_code = _salvage(prompt) if prompt else ""
    if prompt_code:
        prompt_code = _without_definitions(prompt_code, _top_level_names(answer))
    combined = f"{prompt_code.rstrip()}\n\n\n{answer}" if prompt_code.strip() else answer
    return _definitions_only(combined)


def sanitize_mbpp(completion: str, entry_point: str | None = None) -> str:
    """Sanitise an answer to a prompt-less problem (MBPP): :func:`sanitize_code` with no prompt."""
    return sanitize_code(completion, "", entry_point)
