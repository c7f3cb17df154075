"""Every command the docs show outside the tour names commands, flags, files and targets that exist.

The tour's ```bash tour``` blocks are run as written by `test_readme_tour.py`; the other commands in
README.md and in the READMEs under examples/ and deployments/ need a cluster, GPUs, S3 or a model
a user brings, so here each is checked as far as it can be without running it:

- `lmaas ...` (also `.venv/bin/lmaas`, after `VAR=value`, `&&`, `|`, inside `$(...)` or after
  `ray job submit ... --`): its subcommands exist, `--help` exits 0, and every flag the docs
  write for it appears in that help, so a renamed flag or command fails here;
- `python jobs/X.py ...`: the job's `--help` exits 0 and lists the flags the docs use;
- `make X`: the Makefile has target X; any `*.yaml`, `*.py` or `jobs/...`-style path exists
  (`--config` files, `serve deploy deployments/serve.yaml`, `ray up cluster.yaml`).

```bash``` blocks are read as shell; the untagged reference blocks (`lmaas models import DIR
--name NAME [--dataset D]`) only for their `lmaas` and `python jobs/` lines. Help runs in one
subprocess through typer's CliRunner (each `lmaas` process costs 1-2 s of imports), plus one real
run of the installed console script.

    .venv/bin/python -m pytest tests/e2e/test_readme_commands.py
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO  # noqa: E402
from test_readme_tour import tour_section  # noqa: E402

DOCS = ("README.md", "deployments/README.md", "examples/README.md",
        *sorted(str(p.relative_to(REPO)) for p in REPO.glob("examples/*/README.md")))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTS = {">", ">>", "<"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
REPO_PATH = re.compile(r"(jobs|deployments|examples|bench)/\S+|\S+\.(yaml|yml|py)")
# programs the docs show that this test does not run (their own tools, or no command of lmaas's)
NOT_CHECKED = {"curl", "grep", "export", "source", "cp", "echo", "pip"}


@dataclass(frozen=True)
class Shown:
    """One simple command as the docs show it."""

    where: str
    """`file:line` of the (first physical) line it is on."""
    line: str
    words: tuple[str, ...]
    """The command's words, leading `VAR=value` assignments dropped."""

    def problem(self, message: str) -> str:
        return f"{self.where}: `{self.line}`: {message}"

    @property
    def flags(self) -> list[str]:
        return [w.split("=")[0] for w in self.words if re.match(r"--?[A-Za-z]", w)]


def blocks() -> list[tuple[str, int, str, str]]:
    """(file, line of the block's first body line, info string, body) of every fenced block, README's tour left out."""
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        skip = range(0)
        if doc == "README.md":
            tour = tour_section()
            skip = range(text.index(tour), text.index(tour) + len(tour))
        for m in FENCE.finditer(text):
            if m.start() not in skip:
                found.append((doc, text.count("\n", 0, m.start("body")) + 1, m["info"].strip(), m["body"]))
    return found


def logical_lines(body: str, first: int) -> list[tuple[int, str]]:
    """Lines with their backslash continuations joined, each with the number of its first line."""
    lines, current, start = [], "", first
    for number, raw in enumerate(body.splitlines(), first):
        text = raw.strip()
        if not current:
            start = number
        if text.endswith("\\"):
            current += text[:-1].rstrip() + " "
            continue
        lines.append((start, current + text))
        current = ""
    return [(n, line) for n, line in lines if line]


def simple_commands(tokens: list[str]) -> list[list[str]]:
    """Split shell tokens at `|`, `&&`, `;`, `&` and `$( )` (whose inside is a command of its own); drop redirections."""
    commands, current, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "(" and current and current[-1].endswith("$"):
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            commands += simple_commands(tokens[i + 1 : j - 1])
            current[-1] = current[-1][:-1] + "SUBSTITUTED"
            i = j
            continue
        if token in REDIRECTS:
            i += 2
            continue
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
        i += 1
    return [c for c in [*commands, current] if c]


def without_comment(line: str) -> str:
    """`line` up to an unquoted `#` that starts a word (as bash reads it; shlex would cut `http://h/#x` too)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_commands(where: str, line: str) -> list[Shown]:
    lexer = shlex.shlex(without_comment(line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    shown = []
    for words in simple_commands(list(lexer)):
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words:
            shown.append(Shown(where, line, tuple(words)))
    return shown


def reference_commands(where: str, line: str) -> list[Shown]:
    """`lmaas` commands of an untagged reference line: `[--opt X]`, `(--a, --b)` and `a | b` are notation; a
    column two or more spaces on that starts with `lmaas` is another command (other columns describe)."""
    line = without_comment(line.strip().removeprefix("$ "))
    if re.match(r"python3?\s+jobs/", line):
        return shell_commands(where, line)
    shown = []
    for part in re.split(r"\s{2,}(?=lmaas\s)|\s+&&\s+", line):
        words = re.findall(r"[^\s\[\]()|,]+", part)
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        if len(words) > 1 and words[0] == "lmaas" and re.match(r"[a-z]", words[1]):
            shown.append(Shown(where, line, tuple(words)))
    return shown


def shown_commands() -> list[Shown]:
    """Every simple command of the docs' bash blocks (outside the tour) and the lmaas lines of their reference blocks."""
    shown = []
    for doc, first, info, body in blocks():
        if info == "bash" or (info.startswith("bash") and info != "bash tour"):
            parse = shell_commands
        elif info == "":
            parse = reference_commands
        else:
            continue  # python, yaml and other code
        for number, line in logical_lines(body, first):
            shown += parse(f"{doc}:{number}", line)
    return shown


@dataclass
class Checks:
    """What to check for the shown commands, sorted by kind."""

    lmaas: list[Shown]
    jobs: list[Shown]
    """`python jobs/X.py ...`: words[1] is the script."""
    problems: list[str]


def sort_out(shown: list[Shown]) -> Checks:
    checks = Checks([], [], [])
    targets = makefile_targets()
    for command in shown:
        program, args = Path(command.words[0]).name, list(command.words[1:])
        for word in args:
            value = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
            in_repo = REPO_PATH.fullmatch(value) and "://" not in value and not value.startswith(("/", "$", "~"))
            if in_repo and not (REPO / value).exists():
                checks.problems.append(command.problem(f"{value} does not exist"))
        if program == "lmaas":
            checks.lmaas.append(command)
        elif re.fullmatch(r"python[0-9.]*", program):
            if args and args[0].startswith("jobs/") and args[0].endswith(".py"):
                checks.jobs.append(command)
            elif args and not args[0].startswith("-") and not args[0].endswith(".py"):
                checks.problems.append(command.problem(f"python runs {args[0]!r}, which this test does not know"))
        elif program == "ray" and args[:2] == ["job", "submit"]:
            if "--" not in args:
                checks.problems.append(command.problem("`ray job submit` needs `--` before the entrypoint"))
                continue
            nested = sort_out([Shown(command.where, command.line, tuple(args[args.index("--") + 1 :]))])
            checks.lmaas += nested.lmaas
            checks.jobs += nested.jobs
            checks.problems += nested.problems
        elif program == "make":
            for target in (a for a in args if not ASSIGNMENT.match(a)):
                if target not in targets:
                    checks.problems.append(command.problem(f"the Makefile has no target {target!r} (it has {sorted(targets)})"))
        elif program not in {"ray", "serve", *NOT_CHECKED}:
            checks.problems.append(command.problem(f"{program!r}: add a check for it here, or name it in NOT_CHECKED"))
    return checks


def makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_. -]+?)\s*:(?!=)", line)
        if m and not line.startswith((" ", "\t")):
            targets |= set(m[1].split())
    return targets - {".PHONY"}


def has_flag(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


# Runs in one subprocess: resolve each `lmaas` word list to its subcommand path, print each path's
# --help through typer's CliRunner, and each job script's --help through runpy.
HELPER = r"""
import contextlib, io, json, runpy, sys

import typer.main
from typer.testing import CliRunner

from lmaas.cli.main import app

request_file, answer_file = sys.argv[1:3]
request = json.loads(open(request_file).read())
root, runner = typer.main.get_command(app), CliRunner()
out = {"paths": [], "help": {}, "jobs": {}}
for words in request["lmaas"]:
    command, path, error = root, [], None
    for word in words:
        commands = getattr(command, "commands", None)
        if word.startswith("-") or commands is None:
            break  # an option, or the arguments of a command that is not a group
        if word not in commands:
            error = f"`{' '.join(['lmaas', *path])}` has no command {word!r} (it has {', '.join(sorted(commands))})"
            break
        command = commands[word]
        path.append(word)
    out["paths"].append({"path": path, "error": error})
    key = " ".join(path)
    if key not in out["help"]:
        result = runner.invoke(app, [*path, "--help"], prog_name="lmaas")
        out["help"][key] = {"code": result.exit_code, "output": result.output}
for script in request["jobs"]:
    captured, code = io.StringIO(), "did not exit: it does not take --help"
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code or 0
    out["jobs"][script] = {"code": code, "output": captured.getvalue()}
open(answer_file, "w").write(json.dumps(out))
"""


def test_the_docs_show_commands_of_every_kind_checked_here():
    checks = sort_out(shown_commands())
    assert len(checks.lmaas) >= 40 and len(checks.jobs) >= 8, (len(checks.lmaas), len(checks.jobs))
    lines = {c.line for c in checks.lmaas}
    assert any(line.startswith("lmaas deploy tiny-lm@production --canary") for line in lines)  # a continued line
    assert any("ray job submit" in line and "lmaas quickstart" in line for line in lines)  # after `--`
    assert any(line.startswith("export LMAAS_API_KEY=$(lmaas keys create") for line in lines)  # inside $( )
    assert not any("tour-lm" in line for line in lines)  # the tour is test_readme_tour's


def test_the_docs_commands_name_files_and_make_targets_that_exist():
    problems = list(dict.fromkeys(sort_out(shown_commands()).problems))  # a `ray job submit` entrypoint is checked twice
    assert not problems, "\n".join(problems)


def test_the_docs_lmaas_and_job_commands_exist_with_the_flags_they_show(cli, lmaas_env, tmp_path):
    checks = sort_out(shown_commands())
    jobs = sorted({c.words[1] for c in checks.jobs})
    request, answer = tmp_path / "request.json", tmp_path / "answer.json"
    request.write_text(json.dumps({"lmaas": [list(c.words[1:]) for c in checks.lmaas], "jobs": jobs}))
    helper = subprocess.run(
        [sys.executable, "-c", HELPER, str(request), str(answer)],
        env={**lmaas_env, "COLUMNS": "250"}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert helper.returncode == 0, helper.stdout[-3000:] + helper.stderr[-3000:]
    out = json.loads(answer.read_text())

    problems, resolved = [], []
    for command, found in zip(checks.lmaas, out["paths"], strict=True):
        if found["error"]:
            problems.append(command.problem(found["error"]))
            continue
        key = " ".join(found["path"])
        resolved.append((key, command))
        help_ = out["help"][key]
        if help_["code"] != 0:
            problems.append(command.problem(f"`lmaas {key} --help` exits {help_['code']}: {help_['output'][-500:]}"))
        for flag in command.flags:
            if not has_flag(flag, help_["output"]):
                problems.append(command.problem(f"`lmaas {key}` has no option {flag} (see `lmaas {key} --help`)"))
    for command in checks.jobs:
        script, help_ = command.words[1], out["jobs"][command.words[1]]
        if help_["code"] != 0:
            problems.append(command.problem(f"`python {script} --help` exits {help_['code']}: {help_['output'][-500:]}"))
        for flag in command.flags:
            if not has_flag(flag, help_["output"]):
                problems.append(command.problem(f"{script} has no option {flag} (see `python {script} --help`)"))
    assert not problems, "\n".join(problems)

    # the help of the command with the most flags, from the installed console script as a user types it
    key, command = max(resolved, key=lambda kc: len(kc[1].flags))
    real = cli(*key.split(), "--help", env=lmaas_env)
    assert real.returncode == 0, real.stdout + real.stderr
    assert f"Usage: lmaas {key}" in real.stdout
    assert all(has_flag(f, real.stdout) for f in command.flags), (command.line, real.stdout)


def test_the_quickstart_sample_shows_the_schema_the_code_migrates_to():
    from lmaas.db import head_revision

    shown = re.findall(r"schema (\d{4})\)", (REPO / "README.md").read_text())
    head = head_revision()
    assert shown and set(shown) == {head}, f"README's quickstart sample shows schema {shown}; the migrations end at {head}"
