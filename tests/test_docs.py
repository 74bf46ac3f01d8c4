"""The docs run: every fenced `bash` block of README.md and docs/*.md is executed, on tiny data, unless the line
directly above its opening fence is `<!-- not run: <reason> -->` (a cluster, a GPU, a server, more than 5 minutes).

Each document gets one fresh copy of the project (its files as git sees them, in a new git repository, so that
`dvc exp run` works) and runs its blocks there in order, because later blocks use what earlier ones made (train,
then evaluate, then resume). A block is one bash script, `set -euo pipefail`, with the project copy as its cwd, the
venv first on PATH (`python` and `dvc` are the venv's) and no VAELAB_ROOT, DVC_ROOT or MLFLOW_TRACKING_URI: as a user
in a fresh clone runs it.

What is rewritten, line by line (a line ending in `\\` continues on the next; comments stay where they are), and
nothing else:

- `python pipelines/{train,evaluate,search}.py ...` gets the size caps of `CAPS` (and, when it is a search, of
  `SEARCH_CAPS`): a key the command does not set is appended, a key it sets above its cap is lowered in place, a
  key it sets at or below its cap stays. Which data, model, objective, experiment, sweep, search space or launcher
  the command chooses is never touched, so the command still takes its own code path; only the number of training
  and validation images, epochs, importance samples, test images, gap-refinement steps and trials shrink. (Hydra
  takes the last value of a key given twice; lowering a value in place keeps the command readable in a report.)
  Fashion-MNIST, the default data, comes from Debian's package, so it needs no download. A `resume=` command gets
  no caps: it accepts no overrides, and the run it continues already has them.
- `python pipelines/prepare.py ...` is run as written (about 5 s for Fashion-MNIST).
- `dvc exp run ...` gets the same caps as `-S key=value`, so the stages it runs train and evaluate on tiny data too.
- `dvc queue start ...` is followed by a wait until the queue has run every experiment, which fails if one failed:
  the block would otherwise end while its experiments still run, in a copy that is about to be deleted.

A block fails when a command exits non-zero, and also when a search in it reports a failed trial or no completed
one (a search exits 0 however its trials ended). A failure names the document, the line and the command (as written
there and as run), with the output's tail.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.config import REPO, needs_fashion_mnist
from helpers.processes import copy_repo

DOCUMENTS = ["README.md", *sorted(f"docs/{page.name}" for page in (REPO / "docs").glob("*.md"))]

# The most a docs command may ask for: small enough that every runnable block takes seconds to a minute or two on
# two CPU cores, large enough that every code path it names still runs (a validation epoch, an importance-sampled
# estimate, a search with a completed trial to report).
CAPS = {
    "data.limit_train": 256,  # training images
    "trainer.max_epochs": 1,
    "+trainer.limit_val_batches": 2,  # val batches per epoch (Lightning's Trainer argument), of data.batch_size
    "eval.iw_k": 10,  # importance samples per test image
    "eval.limit": 200,  # test images
    "eval.val_iw_k": 4,
    "eval.val_limit": 200,  # val images for val/nll_iw
    "eval.gaps_limit": 10,  # test images the gap split refines q(z|x) on
    "eval.gaps_steps": 20,  # refinement steps per image
}
SEARCH_CAPS = {"hydra.sweeper.n_trials": 2}
CAPPED_ENTRY_POINTS = ("train", "evaluate", "search")

NOT_RUN = re.compile(r"<!-- not run: (?P<reason>\S.*?) -->")
FENCE = re.compile(r"^(?P<fence>```+)(?P<info>[^`]*)$")

BLOCK_TIMEOUT_S = 600
OUTPUT_TAIL = 3000
FAILED = "docs-block-failed"
# Before every block: the strict mode, a note of the failing line and command for the report, and the wait that
# follows `dvc queue start`. One line, so that the block's line n is the script's line n + 1.
PRELUDE = (
    "set -euo pipefail; "
    f"""trap 'echo "{FAILED} $LINENO exit $?: $BASH_COMMAND" >&2' ERR; """
    "docs_wait_for_dvc_queue() { "
    "while dvc queue status | grep -qE '\\b(Queued|Running)\\b'; do sleep 3; done; "
    "dvc queue stop >/dev/null 2>&1 || true; "
    "if dvc queue status | grep -q Failed; then dvc queue status >&2; return 1; fi; "
    "}"
)


class DocsError(ValueError):
    """A document breaks the docs test's rules (a `not run` comment without a reason, or not above a bash block)."""


@dataclass(frozen=True)
class Block:
    document: str  # its path relative to the repository
    line: int  # the line of its opening fence, from 1
    lines: tuple[str, ...]  # its content, the fences excluded
    not_run: str | None  # the reason given above it, or None: it runs

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def bash_blocks(text: str, document: str) -> list[Block]:
    """Every ```bash block of a Markdown text, each with the `<!-- not run: reason -->` directly above it, if any.

    Raises DocsError for a `not run` comment without a reason, or one that is not directly above a ```bash fence:
    either would silently run (or skip) a block that its author meant otherwise."""
    lines = text.splitlines()
    blocks: list[Block] = []
    fence: str | None = None  # the open fence's backticks, inside a block
    for index, line in enumerate(lines):
        if fence is not None:
            if line.strip() == fence:
                fence = None
            continue
        if "<!-- not run" in line:
            if not NOT_RUN.fullmatch(line.strip()):
                raise DocsError(f"{document}:{index + 1}: write `<!-- not run: <reason> -->`, with a reason: {line!r}")
            following = lines[index + 1] if index + 1 < len(lines) else ""
            if following.strip() != "```bash":
                raise DocsError(f"{document}:{index + 1}: a `not run` comment must sit directly above a ```bash fence")
        opening = FENCE.match(line)
        if not opening:
            continue
        fence = opening["fence"]
        if opening["info"].strip() != "bash":
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == fence), None)
        if end is None:
            raise DocsError(f"{document}:{index + 1}: a ```bash block that never closes")
        above = NOT_RUN.fullmatch(lines[index - 1].strip()) if index else None
        blocks.append(Block(document, index + 1, tuple(lines[index + 1 : end]), above["reason"] if above else None))
    return blocks


def document_blocks(document: str) -> list[Block]:
    return bash_blocks((REPO / document).read_text(), document)


# Rewriting a block for tiny data


def code_and_comment(line: str) -> tuple[str, str]:
    """A physical line split before its comment: a `#` outside quotes that starts a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i:]
    return line, ""


def commands(lines: list[str]) -> list[list[int]]:
    """The block's lines grouped into commands: a line ending in a backslash continues on the next."""
    groups: list[list[int]] = []
    continued = False
    for i, line in enumerate(lines):
        if continued:
            groups[-1].append(i)
        else:
            groups.append([i])
        continued = code_and_comment(line)[0].rstrip().endswith("\\")
    return groups


def given_values(words: list[str], search_shorthand: bool) -> dict[str, str]:
    """The `key=value` overrides among a command's words, `search.<key>` read as `hydra.sweeper.<key>` for
    pipelines/search.py (its shorthand)."""
    given = {}
    for word in words:
        key, equals, value = word.lstrip("+~").partition("=")
        if equals:
            if search_shorthand and key.startswith("search."):
                key = "hydra.sweeper." + key.removeprefix("search.")
            given[key] = value
    return given


def shorthand(key: str) -> str:
    """How pipelines/search.py spells a key: `search.<key>` for `hydra.sweeper.<key>`."""
    return "search." + key.removeprefix("hydra.sweeper.") if key.startswith("hydra.sweeper.") else key


def within(value: str, cap: int) -> bool:
    try:
        return float(value) <= cap
    except ValueError:  # null (all), an interpolation, a sweep: not known to be small
        return False


def caps_for(words: list[str]) -> tuple[dict[str, int], str] | None:
    """The caps a command gets and how it spells an override ("key=value" or "-S key=value"), or None for a
    command that runs as written."""
    entry = re.fullmatch(r"pipelines/(\w+)\.py", words[1]) if len(words) > 1 and words[0] == "python" else None
    if entry and entry[1] in CAPPED_ENTRY_POINTS:
        if any(re.match(r"\+?resume[.=]", word) for word in words):
            return None  # a resume takes the run's own (already capped) config and refuses other overrides
        search = entry[1] == "search" or (
            bool({"-m", "--multirun"} & set(words))
            and any(w.startswith("hparams_search=") or w == "hydra/sweeper=optuna" for w in words)
        )
        return ({**CAPS, **SEARCH_CAPS} if search else CAPS), "{key}={value}"
    if words[:3] == ["dvc", "exp", "run"]:
        return CAPS, "-S {key}={value}"
    return None


def tiny_command(lines: list[str]) -> list[str]:
    """One command's physical lines with the caps applied: a key given above its cap is lowered where it stands,
    a key not given is appended to the last line, before its comment."""
    words = shlex.split(" ".join(code_and_comment(line)[0].rstrip().removesuffix("\\") for line in lines))
    if words[:3] == ["dvc", "queue", "start"]:
        code, comment = code_and_comment(lines[-1])
        return [*lines[:-1], f"{code.rstrip()} && docs_wait_for_dvc_queue {comment}".rstrip()]
    found = caps_for(words)
    if found is None:
        return list(lines)
    caps, spelling = found
    search_shorthand = words[1] == "pipelines/search.py"
    given = given_values(words, search_shorthand)
    lines = list(lines)
    added = []
    for written, cap in caps.items():
        key = written.lstrip("+")  # `+` adds a key the config lacks; the command may have added it itself
        if key not in given:
            added.append(spelling.format(key=shorthand(written) if search_shorthand else written, value=cap))
        elif not within(given[key], cap):
            spelled = {key, shorthand(key)} if search_shorthand else {key}
            pattern = re.compile(rf"(?<![\w.])((?:{'|'.join(map(re.escape, spelled))})=)[^\s'\"]+")
            lines = [pattern.sub(rf"\g<1>{cap}", line) for line in lines]
    if added:
        code, comment = code_and_comment(lines[-1])
        lines[-1] = f"{code.rstrip()} {' '.join(added)} {comment}".rstrip()
    return lines


def tiny_script(block: Block) -> str:
    """The block as the bash script the docs test runs: the prelude on line 1, then its lines, rewritten."""
    rewritten: list[str] = []
    for group in commands(list(block.lines)):
        rewritten += tiny_command([block.lines[i] for i in group])
    return "\n".join([PRELUDE, *rewritten]) + "\n"


# Running a document


def failure_report(block: Block, script: str, returncode: int, output: str) -> str:
    """The document, its line and command (as written and as run), and the output's tail."""
    noted = re.findall(rf"^{FAILED} (\d+) exit \d+: (.*)$", output, flags=re.MULTILINE)
    if noted:
        script_line, as_run = int(noted[-1][0]), noted[-1][1]
        index = script_line - 2  # the script's line 1 is the prelude
        # bash names one line of a command continued over several (the first, or the last): report all of them
        group = next((g for g in commands(list(block.lines)) if index in g), [index])
        line = block.line + 1 + group[0]
        written = " ".join(block.lines[i].strip() for i in group if 0 <= i < len(block.lines))
    else:  # killed before bash could say where
        line, written, as_run = block.line, "(the block)", script.splitlines()[-1]
    return (
        f"{block.document}:{line}: `{written}` failed (exit {returncode})\n"
        f"  run as: {as_run}\n"
        f"--- output tail ---\n{output[-OUTPUT_TAIL:]}"
    )


def unsuccessful_searches(output: str) -> list[str]:
    """The summary lines of searches with a failed trial or no completed one. A search exits 0 however its trials
    ended (a failed trial is one of its results), so the exit status alone would let such a block pass."""
    return [
        line
        for line, complete, fail in re.findall(
            r"^(search: study .*\((\d+) complete, \d+ pruned, (\d+) fail\).*)$", output, re.M
        )
        if int(fail) or not int(complete)
    ]


def run_block(block: Block, root: Path, env: dict[str, str]) -> float:
    """Run one block in project `root`; return its wall time in seconds, or fail with `failure_report`."""
    script = tiny_script(block)
    start = time.monotonic()
    try:
        done = subprocess.run(
            ["bash", "-c", script, f"bash {block.where}"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.output or ""
        output = output if isinstance(output, str) else output.decode(errors="replace")
        pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s\n{output[-OUTPUT_TAIL:]}")
    if done.returncode != 0:
        pytest.fail(failure_report(block, script, done.returncode, done.stdout), pytrace=False)
    failed_searches = unsuccessful_searches(done.stdout)
    if failed_searches:
        lines = "\n".join(failed_searches)
        pytest.fail(f"{block.where}: a search in this block did not succeed:\n{lines}\n{done.stdout[-OUTPUT_TAIL:]}")
    return time.monotonic() - start


def run_document(blocks: list[Block], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The runnable blocks of one document, in order, in one fresh project copy: each block's wall time."""
    root, env = copy_repo(tmp_path, monkeypatch, [])
    env = {**env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return {block.where: run_block(block, root, env) for block in blocks if block.not_run is None}


# The slow tier: the documents themselves


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(1800)
@needs_fashion_mnist
@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_runnable_bash_block_of_the_document_runs_on_tiny_data(
    document: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    blocks = document_blocks(document)
    if all(block.not_run for block in blocks):
        reasons = "; ".join(f"{block.where}: {block.not_run}" for block in blocks) or "no bash block"
        pytest.skip(f"nothing to run in {document} ({reasons})")
    times = run_document(blocks, tmp_path, monkeypatch)
    print(" ".join(f"{where} {seconds:.0f} s" for where, seconds in times.items()))


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_block_is_reported_with_its_document_line_command_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    text = "Intro.\n\n```bash\necho first\npython pipelines/train.py model.latent_dim=0   # refused\necho never\n```\n"
    [block] = bash_blocks(text, "docs/broken.md")
    with pytest.raises(pytest.fail.Exception) as failed:
        run_document([block], tmp_path, monkeypatch)
    report = str(failed.value)
    assert report.startswith("docs/broken.md:5: `python pipelines/train.py model.latent_dim=0   # refused` failed")
    assert "(exit 2)" in report
    assert "run as: python pipelines/train.py model.latent_dim=0 data.limit_train=256" in report
    assert "model.latent_dim=0: allowed an integer >= 1" in report  # the command's own output
    assert "first" in report and "never" not in report  # the block stopped at its failing command


# The quick tier: the extraction and rewriting rules


def test_only_bash_blocks_are_extracted_and_the_comment_directly_above_decides_whether_one_runs():
    text = (
        "```text\nnot a command\n```\n"
        "<!-- not run: needs a SLURM cluster -->\n```bash\nsbatch search.sbatch\n```\n"
        "\n```bash\nmake params\n```\n"
        "```python\nprint('not bash')\n```\n"
    )
    first, second = bash_blocks(text, "doc.md")
    assert (first.line, first.lines, first.not_run) == (5, ("sbatch search.sbatch",), "needs a SLURM cluster")
    assert (second.line, second.lines, second.not_run) == (9, ("make params",), None)


def test_a_not_run_comment_without_a_reason_is_refused():
    with pytest.raises(DocsError, match=r"doc\.md:2: .*with a reason"):
        bash_blocks("Text.\n<!-- not run -->\n```bash\nmake ui\n```\n", "doc.md")
    with pytest.raises(DocsError, match="with a reason"):
        bash_blocks("<!-- not run: -->\n```bash\nmake ui\n```\n", "doc.md")


def test_a_not_run_comment_that_is_not_directly_above_a_bash_block_is_refused():
    with pytest.raises(DocsError, match=r"doc\.md:1: .*directly above"):
        bash_blocks("<!-- not run: a server -->\n\n```bash\nmake ui\n```\n", "doc.md")
    with pytest.raises(DocsError, match="directly above"):
        bash_blocks("<!-- not run: a server -->\n```\nmake ui\n```\n", "doc.md")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_document_follows_the_docs_test_rules(document: str):
    document_blocks(document)  # raises DocsError


def test_a_search_with_a_failed_trial_or_none_completed_counts_as_a_failure():
    study = "search: study 'default' in sqlite:////p/optuna.db: 2 finished trials of n_trials=2 "
    ended = ["(2 complete, 0 pruned, 0 fail)", "(1 complete, 0 pruned, 1 fail)", "(0 complete, 2 pruned, 0 fail)"]
    assert unsuccessful_searches("\n".join(study + counts for counts in ended)) == [study + c for c in ended[1:]]


def test_a_failure_in_a_continued_command_is_reported_at_its_first_line_with_all_of_it():
    block = Block("docs/d.md", 10, ("make params", "python pipelines/train.py \\", "  data=nope   # wrong"), None)
    output = f"vaelab: invalid config\n{FAILED} 4 exit 2: python pipelines/train.py data=nope\n"
    report = failure_report(block, tiny_script(block), 2, output)
    assert report.startswith("docs/d.md:12: `python pipelines/train.py \\ data=nope   # wrong` failed (exit 2)")
    assert "run as: python pipelines/train.py data=nope" in report and "vaelab: invalid config" in report


def test_train_commands_get_the_caps_they_lack_and_keep_what_they_choose():
    block = Block("d.md", 1, ("python pipelines/train.py experiment=quick trainer.max_epochs=10   # ~10 s",), None)
    script = tiny_script(block).splitlines()
    assert script[0] == PRELUDE
    command, comment = code_and_comment(script[1])
    words = shlex.split(command)
    assert words[:4] == ["python", "pipelines/train.py", "experiment=quick", "trainer.max_epochs=1"]
    assert "data.limit_train=256" in words and "eval.iw_k=10" in words
    assert words.count("trainer.max_epochs=1") == 1 and "hydra.sweeper.n_trials=2" not in words
    assert comment == "# ~10 s"


def test_a_value_within_its_cap_stays_and_searches_get_a_trial_cap_in_their_own_spelling():
    [search] = tiny_command(["python pipelines/search.py search.n_trials=40 trainer.max_epochs=1 eval.iw_k=5"])
    words = shlex.split(search)
    assert "search.n_trials=2" in words and "trainer.max_epochs=1" in words and "eval.iw_k=5" in words
    assert not any(w.startswith("hydra.sweeper.n_trials") for w in words)
    [shorthand] = tiny_command(["python pipelines/search.py search=architecture"])
    assert "search.n_trials=2" in shlex.split(shorthand) and "data.limit_train=256" in shlex.split(shorthand)
    [hydra_form] = tiny_command(["python pipelines/train.py -m 'posterior=choice(a,b)' hparams_search=default"])
    assert shlex.split(hydra_form)[3:5] == ["posterior=choice(a,b)", "hparams_search=default"]
    assert "hydra.sweeper.n_trials=2" in shlex.split(hydra_form)


def test_continued_lines_resume_commands_and_other_tools_are_rewritten_only_as_documented():
    continued = ["python pipelines/train.py -m sweep=beta \\", "  trainer.max_epochs=9   # long"]
    first, last = tiny_command(continued)
    assert first == continued[0]
    assert last.startswith("  trainer.max_epochs=1 data.limit_train=256") and last.endswith("# long")
    assert tiny_command(["python pipelines/train.py resume=last"]) == ["python pipelines/train.py resume=last"]
    assert tiny_command(["python pipelines/prepare.py data=fashion_mnist"]) == [
        "python pipelines/prepare.py data=fashion_mnist"
    ]
    [dvc] = tiny_command(["dvc exp run -S model.latent_dim=8   # an experiment"])
    assert dvc.startswith("dvc exp run -S model.latent_dim=8 -S data.limit_train=256 -S trainer.max_epochs=1")
    [queue] = tiny_command(["dvc queue start -j 2   # then dvc queue status"])
    assert queue == "dvc queue start -j 2 && docs_wait_for_dvc_queue # then dvc queue status"
    assert tiny_command(["make params"]) == ["make params"]
    [given] = tiny_command(["python pipelines/train.py +trainer.limit_val_batches=100"])
    assert "+trainer.limit_val_batches=2" in shlex.split(given) and "100" not in given
