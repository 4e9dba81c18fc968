"""The documents point at things that exist: every relative link and every repository path named in
README.md, docs/RESULTS.md and benchmarks/README.md exists (and every #anchor names a heading), and
every command in README.md's code blocks runs a script that exists with flags its parser accepts
(checked against the --help of the script's parse_args), and the built-in VPO's values named in the
scripts' help are the ones they use."""
import argparse
import contextlib
import functools
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/RESULTS.md", "benchmarks/README.md")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")


def read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text):
    prose = FENCE.sub("", text)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


def top_level():
    """Names at the repository root that git tracks (a path naming anything else is not checked)."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("/")[0] for line in out.splitlines() if line}


def named_paths(text, roots):
    """Repository paths in code spans and code blocks: tokens whose first part is a tracked root name;
    templates (<run>, *, {...}) are left out."""
    chunks = SPAN.findall(FENCE.sub("", text)) + FENCE.findall(text)
    found = set()
    for chunk in chunks:
        for token in re.split(r"[\s\"'(),;=\[\]|]+", chunk):
            token = token.split("::")[0].split("#")[0].rstrip(".:")
            if token.split("/")[0] in roots and not re.search(r"[<>*{}$]", token):
                found.add(token)
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_exist(doc):
    text, base = read(doc), os.path.dirname(os.path.join(ROOT, doc))
    missing = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, doc)
        if not os.path.exists(full):
            missing.append(target)
        elif anchor and full.endswith(".md") and anchor not in anchors(read(os.path.relpath(full, ROOT))):
            missing.append(target)
    assert not missing, f"{doc}: links to nothing: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
    paths = named_paths(read(doc), top_level())
    assert paths, f"{doc}: no repository path found (the parser is broken)"
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{doc}: names paths that do not exist: {missing}"


def commands(text):
    """(script, flags, line) of every python / torchrun / bash command in the ```bash blocks, and of
    every code span that starts with `python SCRIPT` or `SCRIPT.py --flag` (the tables' commands)."""
    lines = [line for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += [span for span in SPAN.findall(FENCE.sub("", text)) if re.match(r"(python \S|\w+\.py --)", span)]
    for line in lines:
        line = re.sub(r"\s#.*$", "", line).strip()
        for part in re.split(r"&&|;|\|", line):
            words = [w.strip("[]") for w in shlex.split(part)]
            words = [w for w in words if w and not re.fullmatch(r"[A-Z_]+=.*", w)]
            if words and words[0].endswith(".py"):
                words.insert(0, "python")
            if not words or words[0] not in ("python", "torchrun", "bash") or "-m" in words[:2]:
                continue
            scripts = [i for i, w in enumerate(words) if w.endswith((".py", ".sh"))]
            assert scripts, f"no script in: {line}"
            i = scripts[0]
            flags = [w.split("=")[0] for w in words[i + 1:] if w.startswith("--")]
            yield words[i], flags, line


@functools.lru_cache(maxsize=None)
def script_module(script):
    """A script of the repository imported in this process (torch is imported once for all)."""
    name = os.path.splitext(os.path.basename(script))[0]
    module = sys.modules.get(name)
    if module is None or os.path.abspath(getattr(module, "__file__", "")) != os.path.join(ROOT, script):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def help_text(script):
    """The --help of a script's parse_args."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        script_module(script).parse_args(["--help"])
    return out.getvalue()


def test_readme_commands_parse():
    found = list(commands(read("README.md")))
    assert found, "no command found in README.md (the parser is broken)"
    for script, _, line in found:
        assert os.path.isfile(os.path.join(ROOT, script)), f"README.md runs a missing script: {line}"
    bad = []
    for script, flags, line in found:
        if not script.endswith(".py") or not flags:
            continue
        known = set(re.findall(r"--[\w-]+", help_text(script)))
        bad += [f"{flag} ({line})" for flag in flags if flag not in known]
    assert not bad, "README.md passes flags its scripts do not accept:\n" + "\n".join(bad)


@pytest.mark.parametrize("script", ["cavp.py", "tpavi.py"])
def test_help_names_the_builtin_values(script, monkeypatch):
    """Every "built-in VPO: X" of a flag's help is the value the built-in VPO gives it: BUILTIN's,
    or the image size for the crop (and cavp's --predict scale)."""
    module, parsers = script_module(script), []
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: parsers.append(self) or real(self, *a, **k))
    module.parse_args(["--data", "vpo_msmi"])
    said = [(a.dest, text.strip()) for a in parsers[0]._actions
            for text in re.findall(r"built-in VPO: ([^);]+)", " ".join((a.help or "").split()))]
    assert len(said) >= 4, f"{script}: the help names too few built-in values (the parser is broken)"
    wrong = []
    for dest, text in said:
        if dest in ("crop", "max_size"):
            ok = text == "its image size"
        else:
            value = module.BUILTIN.get(dest, "<not in BUILTIN>")
            first = text.split(",")[0]
            ok = str(value) == first or (isinstance(value, (int, float)) and not isinstance(
                value, bool) and re.fullmatch(r"[\d.e+-]+", first) and float(first) == value)
        if not ok:
            wrong.append(f"--{dest.replace('_', '-')}: help says {text!r}, "
                         f"BUILTIN {module.BUILTIN.get(dest, '<none>')!r}")
    assert not wrong, f"{script}: " + "; ".join(wrong)
