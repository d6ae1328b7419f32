#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The PALP training scripts authors. Licensed under the Apache License, Version 2.0.
"""Keep the ``# Copied from train_palp.<name>`` blocks of the multi-subject script identical to their originals.

Both training scripts are self-contained: each one can be copied alone into another repository, so they never
import each other. The code they share is duplicated, and every duplicate in the second script is marked on the
line right above it (the convention of transformers and diffusers):

    # Copied from train_palp.palp_losses
    def palp_losses(...):

    # Copied from train_palp.EMBEDDINGS_NAME
    EMBEDDINGS_NAME = "learned_embeds.safetensors"

    # Copied from train_palp.TrainingRun with TrainingRun->MultiSubjectRun,single->multi
    class MultiSubjectRun:

A marker covers one top-level function, class (decorators included) or module-level assignment such as a constant.
``with old->new[,old2->new2]`` applies plain text replacements to the original before comparing, for a copy that
renames something.

    python utils/check_copies.py                       # exit 1 and list every copy that drifted
    python utils/check_copies.py --fix_and_overwrite   # rewrite the drifted copies from their originals

The check fails on: a copy whose text differs from its original, a marker that names something the original does
not define or that does not sit right above a definition, and a definition that is identical to one of the
original but carries no marker (it would silently stop being synchronised).
"""

import argparse
import ast
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ORIGINAL = REPO_ROOT / "train_palp.py"
DEFAULT_COPY = REPO_ROOT / "train_palp_multi_subject.py"
MAX_DIFF_LINES = 40


@dataclass
class Segment:
    """A top-level definition: its name and its 1-based, inclusive line span (decorators included)."""

    name: str
    start: int
    end: int


@dataclass
class Copy:
    marker_line: int
    name: str  # the name in the original
    replacements: list  # (old, new) pairs
    segment: Segment = None


def top_level_segments(source):
    """Name → Segment for every top-level function, class and single-name assignment of ``source``."""
    segments = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
            start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, start = node.targets[0].id, node.lineno
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, start = node.target.id, node.lineno
        else:
            continue
        segments[name] = Segment(name, start, node.end_lineno)
    return segments


def segment_text(lines, segment):
    return "".join(lines[segment.start - 1 : segment.end])


def parse_replacements(text):
    """'A->B, c->d' → [('A', 'B'), ('c', 'd')]."""
    pairs = []
    for part in text.split(","):
        old, arrow, new = part.strip().partition("->")
        if not arrow or not old:
            raise ValueError(f"replacement {part.strip()!r} is not of the form old->new")
        pairs.append((old, new))
    return pairs


def apply_replacements(text, replacements):
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def find_copies(copy_lines, copy_segments, module):
    """The ``# Copied from <module>.<name>`` markers of a file, each with the definition right below it.

    Returns (copies, problems)."""
    marker = re.compile(rf"^# Copied from {re.escape(module)}\.(?P<name>\w+)(?:\s+with\s+(?P<replace>.+?))?\s*$")
    by_start = {segment.start: segment for segment in copy_segments.values()}
    copies, problems = [], []
    for number, line in enumerate(copy_lines, start=1):
        match = marker.match(line.rstrip("\n"))
        if not match:
            if line.lstrip().startswith(f"# Copied from {module}."):
                problems.append(f"line {number}: unreadable marker {line.strip()!r}")
            continue
        try:
            replacements = parse_replacements(match["replace"]) if match["replace"] else []
        except ValueError as error:
            problems.append(f"line {number}: {error}")
            continue
        copy = Copy(number, match["name"], replacements, by_start.get(number + 1))
        if copy.segment is None:
            problems.append(
                f"line {number}: the marker for {module}.{copy.name} must sit directly above a top-level def, class "
                "or assignment"
            )
            continue
        expected = apply_replacements(copy.name, replacements)
        if copy.segment.name != expected:
            problems.append(
                f"line {number}: the marker names {module}.{copy.name} but the definition below it is "
                f"{copy.segment.name!r}"
            )
            continue
        copies.append(copy)
    return copies, problems


def check_file(original_path, copy_path, fix=False):
    """Compare every marked copy in ``copy_path`` with its original; with ``fix``, rewrite the drifted ones.

    Returns (problems, fixed): messages about what is still wrong, and the names that were rewritten."""
    original_path, copy_path = Path(original_path), Path(copy_path)
    module = original_path.stem
    original_source = original_path.read_text()
    original_lines = original_source.splitlines(keepends=True)
    original_segments = top_level_segments(original_source)
    copy_source = copy_path.read_text()
    copy_lines = copy_source.splitlines(keepends=True)
    copy_segments = top_level_segments(copy_source)

    copies, problems = find_copies(copy_lines, copy_segments, module)
    drifted = []  # (copy, expected text)
    for copy in copies:
        if copy.name not in original_segments:
            problems.append(f"line {copy.marker_line}: {original_path.name} defines no top-level {copy.name!r}")
            continue
        expected = apply_replacements(segment_text(original_lines, original_segments[copy.name]), copy.replacements)
        actual = segment_text(copy_lines, copy.segment)
        if actual != expected:
            drifted.append((copy, expected, actual))

    marked = {copy.segment.start for copy in copies}
    for name, segment in copy_segments.items():
        original = original_segments.get(name)
        if segment.start in marked or original is None:
            continue
        if segment_text(copy_lines, segment) == segment_text(original_lines, original):
            problems.append(
                f"line {segment.start}: {name!r} is identical to {module}.{name} but has no "
                f"'# Copied from {module}.{name}' marker above it, so nothing keeps it in sync"
            )

    if not fix:
        for copy, expected, actual in drifted:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(keepends=True),
                    actual.splitlines(keepends=True),
                    fromfile=f"{original_path.name}:{copy.name}",
                    tofile=f"{copy_path.name}:{copy.segment.name}",
                    n=1,
                )
            )
            lines = diff.splitlines(keepends=True)
            if len(lines) > MAX_DIFF_LINES:
                lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more diff lines)\n"]
            problems.append(
                f"line {copy.segment.start}: {copy.segment.name!r} has drifted from {module}.{copy.name}\n"
                + "".join(lines)
            )
        return problems, []

    # Bottom-up, so the line numbers of the copies above stay valid while rewriting.
    for copy, expected, _ in sorted(drifted, key=lambda item: item[0].segment.start, reverse=True):
        copy_lines[copy.segment.start - 1 : copy.segment.end] = [expected]
    if drifted:
        copy_path.write_text("".join(copy_lines))
    return problems, [copy.name for copy, _, _ in drifted]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--original",
        type=str,
        default=str(DEFAULT_ORIGINAL),
        help="The script that holds the originals; its file name (without .py) is the module name in the markers.",
    )
    parser.add_argument(
        "--copy",
        type=str,
        action="append",
        default=None,
        help=f"A script with '# Copied from' markers (repeat for several). Default: {DEFAULT_COPY.name}.",
    )
    parser.add_argument(
        "--fix_and_overwrite",
        action="store_true",
        help="Rewrite every drifted copy from its original instead of failing.",
    )
    return parser.parse_args(input_args)


def main(input_args=None):
    args = parse_args(input_args)
    failed = False
    for copy_path in args.copy or [str(DEFAULT_COPY)]:
        problems, fixed = check_file(args.original, copy_path, fix=args.fix_and_overwrite)
        for name in fixed:
            print(f"{copy_path}: rewrote the copy of {Path(args.original).stem}.{name}")
        for problem in problems:
            print(f"{copy_path}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
    if failed and not args.fix_and_overwrite:
        print(
            "Copies differ from their originals. Change the original and run "
            "`python utils/check_copies.py --fix_and_overwrite` to propagate it.",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
