/*
 * pysource.h — fmx's one model of Python source: tokens, physical and
 * logical lines, top-level blocks and the names they bind, by the rules of
 * CPython 3.11's tokenizer (the one behind `ast` and `compile`). Everything
 * in fmx's C code that reads Python source reads it through this model:
 * the LOC counter (rewards/reward.c), the compiler's preprocessing of a
 * candidate (env/engine/engine.cpp), read_module_source's line marking
 * (env/tools.c) and the oracle's trimming (policies/oracle.c). One model
 * means that what is counted, shown and trimmed is what compiles, and (the
 * model being CPython's) what Python reads.
 *
 * The rules, as CPython applies them:
 *  - \n, \r\n and a lone \r each end a physical line;
 *  - strings of every form: prefixes r, u, b, f and their pairs (any case),
 *    single and triple quotes, escapes (a backslash escapes the next
 *    character, a line end included, in raw strings too); a single-quoted
 *    string that meets a line end unescaped is unterminated and ends there,
 *    a triple-quoted one runs to the end of the source;
 *  - comments run from '#' to the end of the physical line;
 *  - a backslash before a line end joins the next physical line; brackets
 *    ((, [, {) join lines until they close; a stray backslash is skipped;
 *  - a logical line starts at a physical line that is not blank or
 *    comment-only, outside brackets and continuations; its indentation is
 *    CPython's column: a tab moves to the next multiple of 8, a form feed
 *    resets to 0, and when the indentation runs through backslash
 *    continuations (`\` first on a line) the column at the first such
 *    backslash counts if it is not 0, else the column reached on the
 *    following line (so `\` then `    def f` is indented by 4);
 *  - numbers, names (bytes >= 0x80 are name characters) and operators as
 *    the tokenize module spells them; any other character is an error token.
 * The model is built for any bytes: source that is not valid Python gets
 * the same rules as far as they go (an unclosed bracket runs to the end).
 *
 * Not here: the statement grammar beyond what splits a file into top-level
 * blocks, and error messages about invalid Python (the consumers decide).
 */
#ifndef FMX_PYSOURCE_H
#define FMX_PYSOURCE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fmx_pysource fmx_pysource;

typedef enum {
    FMX_PY_NAME,    /* an identifier or a keyword */
    FMX_PY_NUMBER,  /* 1, 0x1f, 1_000, 1.5e-3, 2j */
    FMX_PY_STRING,  /* one literal, prefix and quotes included (an f-string whole) */
    FMX_PY_OP,      /* an operator or delimiter, brackets included */
    FMX_PY_COMMENT, /* '#' to the end of its physical line */
    FMX_PY_ERROR    /* a character Python has no token for ($, ?, !, `) */
} fmx_py_kind;

/* fmx_py_token.flags of a string */
enum {
    FMX_PY_FSTRING = 1,      /* an f prefix */
    FMX_PY_BYTES = 2,        /* a b prefix */
    FMX_PY_RAW = 4,          /* an r prefix */
    FMX_PY_TRIPLE = 8,       /* triple-quoted */
    FMX_PY_UNTERMINATED = 16 /* no closing quote: ends at its line end (triple: the source's end) */
};

typedef struct {
    fmx_py_kind kind;
    unsigned flags;
    size_t start, end; /* the token's bytes [start, end) in the source */
    long line;         /* 1-based physical line of start */
    long col;          /* byte column of start on that line, 0-based */
} fmx_py_token;

/* A physical line. */
typedef struct {
    size_t start, end; /* its bytes, the line end (\n, \r\n, \r) excluded */
    long logical;      /* the logical line it is part of; -1 for a blank or comment-only
                          line between logical lines */
} fmx_py_physline;

/* fmx_py_line.flags */
enum {
    FMX_PY_LINE_BACKSLASH_INDENT = 1 /* its first physical line holds only indentation and a
                                        backslash continuation: CPython takes the indentation
                                        as described above, other Python lexers differ */
};

/* A logical line: one statement, or several joined by `;`, or a compound
 * statement's header with what follows its colon on the same line. */
typedef struct {
    long tok, ntok;   /* its tokens [tok, tok + ntok): comments inside it included */
    long first, last; /* 1-based physical lines: where it starts, where it ends */
    long indent;      /* CPython's indentation column (see above) */
    unsigned flags;   /* FMX_PY_LINE_* */
} fmx_py_line;

typedef enum {
    FMX_PY_BLOCK_OTHER,   /* anything else */
    FMX_PY_BLOCK_IMPORT,  /* `import ...`, `from ... import ...` */
    FMX_PY_BLOCK_DEF,     /* `def NAME` or `async def NAME`, with its decorators and body */
    FMX_PY_BLOCK_CLASS,   /* `class NAME`, with its decorators and body */
    FMX_PY_BLOCK_MAIN,    /* `if __name__ == "__main__":` (either side of ==) and its body */
    FMX_PY_BLOCK_STRINGS, /* a line made only of string literals, no f-string (a docstring) */
    FMX_PY_BLOCK_ASSIGN   /* `NAME = ...` or `NAME: annotation [= ...]` */
} fmx_py_block_kind;

/* A top-level statement: a logical line at indentation 0 (or the file's
 * first logical line, whatever its indentation) and the logical lines after
 * it that are indented deeper; decorators directly above a def or class
 * are part of its block. Blocks cover every logical line, in order. */
typedef struct {
    fmx_py_block_kind kind;
    long line, nlines; /* its logical lines [line, line + nlines) */
    long header;       /* the logical line of its statement (the def after the decorators) */
    long name;         /* DEF, CLASS, ASSIGN: the token of the name it binds; else -1 */
    int decorated;     /* DEF, CLASS: decorators above it */
    int is_async;      /* DEF: `async def` */
} fmx_py_block;

/* Builds the model of src[0, len). src is borrowed: it must stay valid and
 * unchanged until fmx_pysource_close. FMX_OK, FMX_EINVAL (NULL src with
 * len > 0, NULL out) or FMX_ENOMEM. Caller frees *out with
 * fmx_pysource_close. */
int fmx_pysource_open(const char *src, size_t len, fmx_pysource **out);
void fmx_pysource_close(fmx_pysource *ps); /* accepts NULL */

/* The source (borrowed from the caller of open) and its length. */
const char *fmx_pysource_text(const fmx_pysource *ps);
size_t fmx_pysource_len(const fmx_pysource *ps);

/* The model's arrays, borrowed, valid until fmx_pysource_close; each
 * function returns the count and sets *out. */
long fmx_pysource_tokens(const fmx_pysource *ps, const fmx_py_token **out);
long fmx_pysource_physlines(const fmx_pysource *ps, const fmx_py_physline **out);
long fmx_pysource_lines(const fmx_pysource *ps, const fmx_py_line **out);
long fmx_pysource_blocks(const fmx_pysource *ps, const fmx_py_block **out);

/* Whether t is code: a name, number, string, operator or error token (not
 * a comment). */
int fmx_py_is_code(const fmx_py_token *t);

/* Whether token t's text is exactly text (and, kind >= 0, t->kind is kind). */
int fmx_pysource_tok_is(const fmx_pysource *ps, const fmx_py_token *t, int kind, const char *text);

/* The first code token of logical line i, or NULL if it has none. */
const fmx_py_token *fmx_pysource_first_code(const fmx_pysource *ps, long i);

/* The logical line after line i's block: the first line after i that is
 * not indented deeper than i (the number of lines if none). */
long fmx_pysource_block_end(const fmx_pysource *ps, long i);

/* Whether string token t's value, without prefix and quotes, is exactly
 * text (escapes are not decoded: a value with a backslash never matches). */
int fmx_pysource_string_is(const fmx_pysource *ps, const fmx_py_token *t, const char *text);

/* One replacement field of an f-string: the bytes between its { and }. */
typedef struct {
    size_t start, end; /* the field's content, [start, end) in the source */
    size_t expr_end;   /* where its expression ends: at a `=` (debug), `!`
                          (conversion) or `:` (format spec) outside brackets,
                          else end */
    int closed;        /* 0 if the string ended before the field's } */
} fmx_py_field;

/* The replacement fields of f-string token t (its body, with {{ and }} as
 * literal braces), in order; a format spec's nested fields are part of the
 * field they are in. Fills up to cap fields and returns how many there are
 * (0 for a string without an f prefix, or a token that is not a string). */
long fmx_pysource_fields(const char *src, const fmx_py_token *t, fmx_py_field *out, long cap);

/* Code tokens in the replacement fields of f-string token t, fields of the
 * format specs and of f-strings inside them included (8 levels deep): what
 * those fields would be as ordinary code, tokenized by the same rules. 0
 * for a token that is not an f-string. Allocates nothing. */
long fmx_pysource_field_tokens(const char *src, const fmx_py_token *t);

/* The hidden `fmx pysource FILE...` command (for tests): the model of each
 * FILE as one JSON object per line on stdout: tokens [kind, line, col,
 * text], lines [first, last, indent, first code token's line, flags],
 * blocks {kind, name, first, first_token_line, header_token_line, last,
 * decorated, async} (physical lines), physlines (each one's logical line
 * or -1), and "loc": count_loc(source) when count_loc is given. argv[0] is
 * the command's name. 0, or 2 with a message on stderr. */
int fmx_pysource_main(int argc, char **argv, long (*count_loc)(const char *src, size_t len));

#ifdef __cplusplus
}
#endif

#endif
