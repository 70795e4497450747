"""fmx's one model of Python source (env/pysource.h) against Python's own.

Random files (backslash continuations, a backslash alone at the start of a
line, strings ending in a backslash or continued over a line end, prefixes,
triple quotes, f-strings with fields, CR/CRLF/LF line ends, tabs and form
feeds in indentation, nested blocks, decorators, comments, semicolons) are
checked through `fmx pysource`:

- the tokens are those of the tokenize module;
- the logical lines (where each starts and ends) are tokenize's;
- the top-level blocks (where each starts and ends, def/class names, the
  `__main__` block) are those of CPython's parser (ast), which is where
  CPython's indentation rule for a line that starts with a backslash shows;
- the LOC count equals the README's rules computed here from tokenize's
  tokens and ast's blocks.

Line ends: Python reads source with universal newlines (a lone \\r ends a
line); tokenize is given the file with its line ends normalised, fmx the
file as it is.
"""
import ast
import io
import json
import math
import os
import pathlib
import random
import subprocess
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
N_FILES = 400

# ---- random files ----

NAMES = ["x", "y", "h", "w", "acc", "n_heads", "scale", "q", "k", "v", "_tmp", "rb", "fr", "u"]


class Gen:
    """A random, valid Python 3.11 file as a list of physical lines."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.lines: list[str] = []

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def name(self) -> str:
        return self.r.choice(NAMES)

    # -- literals --

    def number(self) -> str:
        return self.r.choice(["1", "0", "42", "0x1f", "0o17", "0b101", "1_000", "1.5", ".5",
                              "1e10", "1.5e-3", "2j", "3.0J", "10."])

    def string(self, multiline_ok: bool = True, fields: bool = True, avoid: str = "") -> list[str]:
        """A string literal as physical lines (more than one when it spans lines)."""
        r = self.r
        prefix = r.choice(["", "", "", "r", "R", "b", "B", "u", "rb", "Rb", "bR", "f", "F", "fr",
                           "rF", "Fr"] if fields else ["", "r", "b", "u", "rb", "R"])
        quotes = [q for q in ("'", '"') if q not in avoid]
        q = r.choice(quotes)
        triple = multiline_ok and self.chance(0.3)
        is_f = "f" in prefix.lower()
        other = '"' if q == "'" else "'"
        body = []
        for _ in range(r.randint(0, 5)):
            kind = r.randint(0, 9)
            if kind == 0:
                body.append("#" if not is_f else "# ")
            elif kind == 1:
                body.append(";")
            elif kind == 2:
                body.append("\\\\")  # an escaped backslash: the literal may end with it
            elif kind == 3:
                body.append("\\" + q)  # an escaped quote
            elif kind == 4:
                body.append(other)
            elif kind == 5 and multiline_ok and not (is_f and not triple):
                body.append("\\\n")  # a line end escaped inside the string
            elif kind == 6 and triple:
                body.append("\n")
            elif kind == 7 and is_f and fields:
                body.append(self.field(q))
            elif kind == 8:
                body.append("{{" if is_f else "{")
            else:
                body.append(r.choice(["abc", " def ", "x = 1", "(", ")", "__main__", "  "]))
        if is_f and triple:
            # a line end inside a triple-quoted f-string's literal part only
            body = [b.replace("\\\n", "\n") for b in body]
        text = "".join(body)
        qq = q * 3 if triple else q
        if triple and text.endswith(q):
            text += " "
        lit = prefix + qq + text + qq
        if "b" in prefix.lower():
            lit = lit.replace("{", "(")
        return lit.split("\n")

    def field(self, outer_quote: str) -> str:
        inner = '"' if outer_quote == "'" else "'"
        return self.r.choice([
            "{x}", "{x + 1}", "{f(y, 2)}", "{h[" + inner + "k" + inner + "]}", "{x!r}",
            "{x:>8}", "{x:{w}}", "{x=}", "{a if b else c}", "{ {1: 2}[1] }", "{(lambda: 1)()}",
            "{x == y}", "{x != y}",
        ])

    def expr(self, depth: int = 0) -> list[str]:
        """An expression as physical lines (brackets may span several)."""
        r = self.r
        k = r.randint(0, 11 if depth < 2 else 4)
        if k == 0:
            return [self.name()]
        if k == 1:
            return [self.number()]
        if k in (2, 3):
            return self.string()
        if k == 4:
            return [f"{self.name()} {r.choice(['+', '-', '*', '@', '//', '**', '%', '<<', '&'])} "
                    f"{self.number()}"]
        if k == 5:
            return [f"{self.name()}.{self.name()}({self.name()}, dim=-1)"]
        if k == 6:  # a call over several lines, comments inside
            inner = [self.expr(depth + 1) for _ in range(r.randint(1, 3))]
            out = [f"{self.name()}("]
            for part in inner:
                part = list(part)
                part[-1] += ","
                if self.chance(0.3):
                    part[-1] += "  # inside (brackets)"
                out += part
                if self.chance(0.2):
                    out.append("")
                if self.chance(0.2):
                    out.append("# a comment line inside the call")
            out.append(")")
            return out
        if k == 7:
            return [f"[{self.name()}, {self.number()}, ({self.name()},)]"]
        if k == 8:
            return [f"{{{self.number()}: {self.name()}, 'k': [1, 2]}}"]
        if k == 9:  # implicit concatenation over lines inside brackets
            return ["("] + self.string() + self.string(fields=False) + [")"]
        if k == 10:
            return [f"lambda a, b=1: a + b"]
        return [f"{self.name()}[1:2, ::3]"]

    # -- statements --

    def emit(self, indent: str, lines: list[str]) -> None:
        """Physical lines of one statement: the first at indent, the rest as written."""
        self.lines.append(indent + lines[0])
        self.lines.extend(lines[1:])

    def simple(self, indent: str) -> None:
        r = self.r
        k = r.randint(0, 9)
        if k <= 2:
            e = self.expr()
            self.emit(indent, [f"{self.name()} = " + e[0]] + e[1:])
        elif k == 3:
            self.emit(indent, [f"{self.name()} = 1; {self.name()} = {self.number()};"
                               if self.chance(0.5) else f"{self.name()} += 1; pass"])
        elif k == 4:  # a backslash continuation in the middle of a statement
            self.emit(indent, [f"{self.name()} = {self.name()} + \\", f"{indent}    {self.number()}"])
        elif k == 5:  # a backslash alone, then the statement
            if self.chance(0.5) or not indent:
                self.lines.append("\\")
                self.lines.append(indent + f"{self.name()} = {self.number()}")
            else:
                self.lines.append(indent + "\\")
                self.lines.append(f"{self.name()} = {self.number()}")
        elif k == 6:
            self.emit(indent, self.string())
        elif k == 7:
            self.emit(indent, [f"{self.name()}: int = {self.number()}  # annotated"])
        elif k == 8:
            self.emit(indent, [f"({self.name()} := {self.number()})"])
        else:
            e = self.expr()
            self.emit(indent, [f"{self.name()}[0] = " + e[0]] + e[1:])

    def body(self, indent: str, unit: str, depth: int, func: bool) -> None:
        r = self.r
        if self.chance(0.3):
            self.emit(indent, self.string(fields=False))  # a docstring
        for _ in range(r.randint(1, 4)):
            k = r.randint(0, 9 if depth < 3 else 3)
            if k <= 3:
                self.simple(indent)
            elif k == 4:
                self.lines.append(r.choice(["", "   ", "\t", "# col 0 comment", "\f"]))
                continue
            elif k == 5:
                head = r.choice([f"if {self.name()} > 1:", f"for i in range({self.number()}):",
                                 f"while {self.name()}:", f"with {self.name()}() as c:",
                                 "if (lambda: 1)():", "for kk in {1: 2}:"])
                if self.chance(0.2):  # a body on the header's line
                    self.lines.append(indent + head + f" {self.name()} = 1; pass")
                    continue
                self.lines.append(indent + head + ("  # header" if self.chance(0.2) else ""))
                self.body(indent + unit, unit, depth + 1, func)
                if self.chance(0.3) and head.startswith("if"):
                    self.lines.append(indent + "else:")
                    self.body(indent + unit, unit, depth + 1, func)
            elif k == 6:
                self.lines.append(indent + "try:")
                self.body(indent + unit, unit, depth + 1, func)
                self.lines.append(indent + "except ValueError as e:")
                self.body(indent + unit, unit, depth + 1, func)
            elif k == 7:
                self.funcdef(indent, unit, depth + 1)
            elif k == 8 and func:
                e = self.expr()
                self.emit(indent, ["return " + e[0]] + e[1:])
            else:
                self.lines.append(indent + "pass")

    def decorators(self, indent: str) -> None:
        for _ in range(self.r.randint(0, 2)):
            self.lines.append(indent + self.r.choice(["@dec", "@dec.attr(1, k=2)", "@(lambda f: f)"]))
            if self.chance(0.2):
                self.lines.append(indent + "# between decorators")

    def funcdef(self, indent: str, unit: str, depth: int, name: str = "") -> None:
        self.decorators(indent)
        name = name or self.r.choice(["f", "forward", "helper", "tap", "g2", "_rms"])
        kw = "async def" if self.chance(0.1) else "def"
        sig = self.r.choice(["(x)", "(x: Tensor, w: Dict[str, Tensor]) -> Tensor",
                             "(n, x=(1, 2), *a, **k)", "(\n    x,\n    y,  # y\n)"])
        first, *rest = (f"{kw} {name}{sig}:").split("\n")
        if self.chance(0.15) and not rest:
            self.lines.append(indent + f"{kw} {name}{sig}: return x")
            return
        self.lines.append(indent + first)
        self.lines.extend(indent + x for x in rest)
        self.body(indent + unit, unit, depth, True)

    def toplevel(self) -> None:
        r = self.r
        k = r.randint(0, 11)
        unit = r.choice(["    ", "  ", "\t", "        "])
        if k == 0:
            self.lines.append(r.choice(["import torch", "import torch.nn.functional as F",
                                        "from typing import (Dict,\n    List)",
                                        "from torch import Tensor; import math"]))
        elif k in (1, 2):
            self.simple("")
        elif k in (3, 4, 5):
            self.funcdef("", unit, 0)
        elif k == 6:
            self.funcdef("", unit, 0, name="tap")
        elif k == 7:
            self.decorators("")
            self.lines.append(f"class C{r.randint(0, 9)}(object):")
            self.body(unit, unit, 1, False)
        elif k == 8:
            side = r.choice(['"__main__"', "'__main__'", '"""__main__"""'])
            self.lines.append(r.choice([f"if __name__ == {side}:", f"if {side} == __name__:"]))
            self.body(unit, unit, 1, False)
        elif k == 9:
            self.lines.append(r.choice(["", "   ", "# a comment", "\f", "  # indented comment"]))
        elif k == 10:
            self.lines.append("\f" + f"{self.name()} = 1")
        else:
            # the hiding tricks: after a def tap, a backslash line and an
            # indented def, or a string continued over a line end
            self.lines.append("def tap(name, x):")
            self.lines.append(unit + "return x")
            if self.chance(0.5):
                self.lines.append("\\")
                self.lines.append(unit + "def hidden(x):")
                self.lines.append(unit * 2 + "return x")
            else:
                self.lines.append(unit + "s = 'abc\\")
                self.lines.append("def not_a_def(x): return x'")

    def file(self) -> str:
        if self.chance(0.4):
            self.lines.extend(self.string(fields=False))
        for _ in range(self.r.randint(2, 9)):
            self.toplevel()
        ends = self.r.choice(["\n", "\r\n", "\r", "mixed"])
        out = []
        for line in self.lines:
            end = self.r.choice(["\n", "\r\n", "\r"]) if ends == "mixed" else ends
            out.append(line + end)
        return "".join(out)


def random_files(n: int) -> list[str]:
    files, seed = [], 0
    while len(files) < n and seed < 20 * n:
        src = Gen(seed).file()
        seed += 1
        try:
            ast.parse(src)
        except SyntaxError:
            continue
        files.append(src)
    assert len(files) == n, f"only {len(files)} valid files out of {seed}"
    return files


# ---- what Python says ----

def normalise(src: str) -> str:
    return src.replace("\r\n", "\n").replace("\r", "\n")


NOT_CODE = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
            tokenize.COMMENT, tokenize.ERRORTOKEN)


def c_tokens(src: str):
    """CPython's own tokenizer, the one behind ast and compile (no comments;
    it reads \r and \r\n as line ends itself)."""
    return list(tokenize._generate_tokens_from_c_tokenizer(src))


def is_code(t) -> bool:
    return t.type not in NOT_CODE


NAMES_TYPES = {tokenize.NAME, getattr(tokenize, "ASYNC", tokenize.NAME),
               getattr(tokenize, "AWAIT", tokenize.NAME)}


def kind(t) -> str:
    if t.type in NAMES_TYPES:
        return "NAME"  # 3.11's tokenizer types async and await apart
    return {tokenize.NUMBER: "NUMBER", tokenize.STRING: "STRING"}.get(t.type, "OP")


def py_comments(src: str):
    """Comments as the tokenize module finds them, or None where it refuses
    the file (it measures the indentation of a line that starts with a
    backslash differently from CPython's tokenizer, and may then find an
    unindent that matches no level)."""
    try:
        return [[t.start[0], t.start[1], t.string] for t in
                tokenize.generate_tokens(io.StringIO(normalise(src)).readline)
                if t.type == tokenize.COMMENT]
    except (IndentationError, tokenize.TokenError):
        return None


def py_logical_lines(toks) -> list[tuple[int, int]]:
    """(first code token's line, line of its NEWLINE) per logical line."""
    out, first = [], None
    for t in toks:
        if is_code(t) and first is None:
            first = t.start[0]
        elif t.type == tokenize.NEWLINE and first is not None:
            out.append((first, t.start[0]))
            first = None
    return out


def py_levels(toks) -> list[int]:
    """Block nesting level of each logical line (INDENT and DEDENT tokens)."""
    out, level, start = [], 0, True
    for t in toks:
        if t.type == tokenize.INDENT:
            level += 1
        elif t.type == tokenize.DEDENT:
            level -= 1
        elif is_code(t) and start:
            out.append(level)
            start = False
        elif t.type == tokenize.NEWLINE:
            start = True
    return out


def fmx_levels(lines) -> list[int]:
    """The same from fmx's indentation columns."""
    out, stack = [], [0]
    for first, last, indent, tok_line, flags in lines:
        while indent < stack[-1]:
            stack.pop()
        if indent > stack[-1]:
            stack.append(indent)
        out.append(len(stack) - 1)
    return out


def is_main(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    t = node.test
    sides = [t.left, *t.comparators]
    return (len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq) and
            any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and
            any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def start_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def py_blocks(src: str) -> list[dict]:
    """Top-level statements grouped by the line they start on (`a; b` is one)."""
    out: list[dict] = []
    for node in ast.parse(src).body:
        line = start_line(node)
        if out and out[-1]["first_token_line"] == line:
            out[-1]["last"] = max(out[-1]["last"], node.end_lineno)
            continue
        kind, name = "other", None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind, name = "def", node.name
        elif isinstance(node, ast.ClassDef):
            kind, name = "class", node.name
        elif is_main(node):
            kind = "main"
        out.append({"kind": kind, "name": name, "first_token_line": line,
                    "last": node.end_lineno})
    return out


def field_tokens(fstring: str) -> int:
    """Tokens of an f-string's replacement fields: each expression as code,
    and the fields nested in format specs."""
    n = 0
    for node in ast.walk(ast.parse(fstring, mode="eval")):
        if isinstance(node, ast.FormattedValue):
            n += sum(is_code(t) for t in c_tokens(ast.unparse(node.value)))
    return n


def is_fstring(tok: str) -> bool:
    return "f" in tok[:tok.index(tok[-1])].lower() if tok[-1] in "'\"" else False


def reference_loc(src: str) -> int:
    """The README's LOC rules on tokenize's tokens and ast's blocks."""
    tree = ast.parse(src)
    zero = []
    for node in tree.body:
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "tap") \
                or is_main(node):
            zero.append((start_line(node), node.end_lineno))
    lines, cur = [], []
    for t in c_tokens(src):
        if is_code(t):
            cur.append(t)
        elif t.type == tokenize.NEWLINE and cur:
            lines.append(cur)
            cur = []
    total, expect_doc = 0, True
    compound_kw = {"if", "elif", "else", "for", "while", "with", "try", "except", "finally",
                   "def", "class", "async"}
    for line in lines:
        if any(a <= line[0].start[0] <= b for a, b in zero):
            expect_doc = False
            continue
        stmt, compound, depth, lambdas = [], False, 0, 0

        def cost(toks):
            return math.ceil(sum(1 + (field_tokens(t.string) if t.type == tokenize.STRING
                                      and is_fstring(t.string) else 0) for t in toks) / 48)

        def end(header: bool):
            nonlocal total, expect_doc, stmt
            first = stmt[0].string
            if header:
                total += cost(stmt)
                expect_doc = first in ("def", "class") or (
                    first == "async" and len(stmt) > 1 and stmt[1].string == "def")
            else:
                doc = expect_doc and all(t.type == tokenize.STRING and not is_fstring(t.string)
                                         for t in stmt)
                if first not in ("import", "from") and not doc:
                    total += cost(stmt)
                expect_doc = False
            stmt = []

        for t in line:
            if not stmt:
                if t.string == ";":
                    continue
                compound, depth, lambdas = t.string in compound_kw, 0, 0
            if not compound and depth == 0 and t.string == ";":
                end(False)
                continue
            stmt.append(t)
            if t.string in ("(", "[", "{"):
                depth += 1
            elif t.string in (")", "]", "}"):
                depth = max(0, depth - 1)
            elif compound and depth == 0:
                if t.string == "lambda":
                    lambdas += 1
                elif t.string == ":" and lambdas:
                    lambdas -= 1
                elif t.string == ":":
                    end(True)
        if stmt:
            end(compound)
    return total


# ---- fmx ----

@pytest.fixture(scope="module")
def modelled(tmp_path_factory):
    """(source, fmx's model) for every random file, one fmx process for all."""
    srcs = random_files(N_FILES)
    d = tmp_path_factory.mktemp("pysource")
    paths = []
    for i, src in enumerate(srcs):
        p = d / f"f{i}.py"
        p.write_bytes(src.encode())
        paths.append(p)
    res = subprocess.run([FMX, "pysource", *map(str, paths)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    models = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(models) == len(srcs)
    return list(zip(srcs, models))


def show(src: str) -> str:
    return "\n".join(f"{i + 1:3} {l!r}" for i, l in enumerate(normalise(src).split("\n")))


def test_the_generator_covers_the_hard_cases(modelled):
    """The random files hold every construct this test is about."""
    text = "".join(src for src, _ in modelled)
    for needle in ("\\\n", "\\\r\n", "\\\r", "\n\\\n", "\\\\'", "\t", "\f", "@dec", "f'",
                   "'''", '"""', ";", "# ", "async def", "__main__"):
        assert needle in text, needle
    assert any("\r" in src and "\r\n" not in src for src, _ in modelled), "no CR-only file"


def test_tokens_are_pythons(modelled):
    checked = 0
    for src, m in modelled:
        want = [[kind(t), t.start[0], t.start[1], t.string] for t in c_tokens(src) if is_code(t)]
        got = [[k, line, col, normalise(text)] for k, line, col, text in m["tokens"]
               if k != "COMMENT"]
        assert got == want, show(src)
        comments = py_comments(src)
        if comments is not None:
            assert [[line, col, text] for k, line, col, text in m["tokens"]
                    if k == "COMMENT"] == comments, show(src)
            checked += 1
    assert checked > len(modelled) // 2


def test_logical_lines_are_pythons(modelled):
    for src, m in modelled:
        toks = c_tokens(src)
        got = [(tok_line, last) for first, last, indent, tok_line, flags in m["lines"]]
        assert got == py_logical_lines(toks), show(src)
        assert fmx_levels(m["lines"]) == py_levels(toks), show(src)


def test_top_level_blocks_and_names_are_pythons(modelled):
    for src, m in modelled:
        want = py_blocks(src)
        got = [{k: b[k] for k in ("kind", "name", "first_token_line", "last")}
               for b in m["blocks"]]
        # fmx names assignments and tells strings and imports apart; ast's
        # kinds here are def, class, main and the rest
        for b in got:
            if b["kind"] not in ("def", "class", "main"):
                b["kind"], b["name"] = "other", None
        assert got == want, show(src)
        defs = [n.name for n in ast.parse(src).body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert [b["name"] for b in m["blocks"] if b["kind"] == "def"] == defs


def test_loc_follows_the_rules_on_pythons_model(modelled):
    for src, m in modelled:
        assert m["loc"] == reference_loc(src), show(src)


# ---- the hiding tricks, one by one ----

TRICKS = {
    # after a top-level def tap, a line holding only a backslash, then an
    # indented def: CPython indents it by 4, inside tap
    "backslash_line_after_tap": (
        "def tap(name, x):\n    return x\n\\\n    def forward(x):\n        return x\n",
        ["tap"]),
    # the same with the backslash indented: the backslash's column counts
    "indented_backslash_then_def": (
        "def tap(name, x):\n    return x\n    \\\ndef forward(x):\n        return x\n", ["tap"]),
    # a backslash at column 0 before a top-level statement
    "backslash_line_top_level": ("x = 1\n\\\ndef forward(x):\n    return x\n", ["forward"]),
    # a single-quoted string continued over a line end: the def is inside it
    "string_ending_in_backslash": (
        "def tap(name, x):\n    s = 'abc\\\ndef forward(x): return x'\n    return x\n", ["tap"]),
    # an escaped backslash ends the string: the def after it is real
    "escaped_backslash": (
        "s = 'abc\\\\'\ndef forward(x):\n    return x\n", ["forward"]),
    # lone carriage returns end lines
    "cr_line_ends": ("def tap(name, x):\r    return x\rdef forward(x):\r    return x\r",
                     ["tap", "forward"]),
    # a form feed resets the indentation column
    "form_feed": ("def tap(name, x):\n    return x\n    \fdef forward(x):\n        return x\n",
                  ["tap", "forward"]),
}


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_hiding_tricks(name, tmp_path):
    src, defs = TRICKS[name]
    assert [n.name for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)] == defs
    p = tmp_path / "t.py"
    p.write_bytes(src.encode())
    res = subprocess.run([FMX, "pysource", str(p)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    assert [b["name"] for b in m["blocks"] if b["kind"] == "def"] == defs
    assert m["loc"] == reference_loc(src)
