"""`shell-commands`: instruction -> command pairs from the cheat sheets shipped in the `cheat` 2.5.1 sdist."""

from __future__ import annotations

import difflib
import re
import tarfile
import textwrap
from pathlib import Path

from lmtailor.data.catalog import download
from lmtailor.data.catalog.registry import Record, register_dataset
from lmtailor.errors import DataError

MAX_COMMAND_CHARS = 300  # longer cheat-sheet blocks are scripts or key tables, not one command

# Sheets that hold reference tables, not commands: ANSI colour-code variables and Markdown syntax.
NOT_COMMAND_SHEETS = frozenset({"ansi", "markdown"})

# A comment that starts like this offers another way to do what the pair above it does ("# OR",
# "# Or the output of another program:", "# ... on destination:", "# Method 2 - ..."): it is no question.
_CONTINUATION = re.compile(r"(?:or\b|\.\.\.|method \d)", re.IGNORECASE)

# A comment of at most HEADING_MAX_WORDS words with none of these verbs (nor a word in -ing; a slip such as
# "Ouput" still counts) is a heading ("Bold", "Roles", "Windows", "Python 3", "More...", "Full command"), not
# an instruction: its block holds a table, a config line or a command whose meaning the heading does not give.
HEADING_MAX_WORDS = 3
_VERB_WORDS = """
    accept activate add append apply attach block boot build cancel change check clean clear clone close
    combine commit compile complement compress concatenate connect continue convert copy count create cut
    debug decode decompress decrypt delete destroy detach diff disable disconnect display do download dump
    edit empty enable encode encrypt enter enumerate erase evaluate execute exit export extract fetch filter
    find follow generate get go grep halt help hibernate hide ignore import initiate insert inspect install
    join kill launch limit link list load lock make merge mount move open output patch pause ping play prepend
    print pull push query quit read reboot receive redirect reject reload remove rename replace reset resize
    restart restore resume return reverse revert rotate run save scan scroll search see select send set show
    shred shutdown sign skip slice sort split start stash stop submit suspend switch sync tail test toggle
    trace track transfer trash truncate turn undo uninstall unlock unmount unzip update upgrade upload use
    verify view wait watch write
"""
_VERBS = frozenset(_VERB_WORDS.split())


def is_heading(instruction: str) -> bool:
    """Whether a cheat-sheet comment is a heading rather than an instruction (see HEADING_MAX_WORDS)."""
    words = instruction.split()
    if len(words) > HEADING_MAX_WORDS:
        return False
    return not any(w in _VERBS or (len(w) > 4 and w.endswith("ing"))
                   or difflib.get_close_matches(w, _VERBS, n=1, cutoff=0.85)
                   for w in re.findall(r"[a-z]+", instruction.lower()))


def parse_cheatsheet(text: str, tool: str) -> list[Record]:
    """Instruction/command pairs from one cheat sheet: each `# comment` block and the command lines under it.

    A block is one or more comment lines directly followed by command lines; a blank line or a new comment
    ends it, except an indented comment inside the command lines, which is part of them (a `# ^D` in a
    heredoc, a `# password` line of a config file). Skipped: blocks with no command (section titles over
    key tables, notes), commands longer than MAX_COMMAND_CHARS, and headings (`is_heading`). A comment
    that continues the pair above it (`# OR`, `# ... on destination:`) is no pair of its own: it and its
    commands are appended to the output above as an alternative, when the whole still fits the limit.

    Args:
        text: the sheet's content.
        tool: the sheet's file name, kept in each record as "tool".

    Returns:
        Records {"instruction", "output", "tool"}.
    """
    records: list[Record] = []
    comment: list[str] = []
    command: list[str] = []
    previous: list[Record | None] = [None]  # the pair of the block above, if it was kept

    def flush() -> None:
        output = textwrap.dedent("\n".join(command)).strip("\n")
        instruction = " ".join(comment).strip().rstrip(":").strip()
        if instruction and _CONTINUATION.match(instruction):
            above = previous[0]
            if above is not None:
                merged = "\n".join([above["output"], "# " + " ".join(comment), *([output] if output else [])])
                if len(merged) <= MAX_COMMAND_CHARS:
                    above["output"] = merged
        elif instruction:
            previous[0] = None
            if output and len(output) <= MAX_COMMAND_CHARS and not is_heading(instruction):
                record = {"instruction": instruction[0].upper() + instruction[1:], "output": output, "tool": tool}
                records.append(record)
                previous[0] = record
        comment.clear()
        command.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            flush()  # a blank line ends a block, also a comment with nothing directly under it
        elif stripped.startswith("#") and not (command and line[0].isspace()):
            if command:
                flush()
            words = stripped.lstrip("#").strip()
            if words:
                comment.append(words)
        elif comment:
            command.append(line)
    flush()
    return records


def parse_cheat_sdist(tar_path: Path) -> list[Record]:
    """Pairs from every command sheet in `cheat/cheatsheets/` of a cheat sdist, read in place.

    Sheets in NOT_COMMAND_SHEETS are skipped; exact duplicate pairs are dropped.

    Args:
        tar_path: the `cheat-X.Y.Z.tar.gz` source archive.

    Returns:
        Records {"instruction", "output", "tool"}, sheets in name order.

    Raises:
        DataError: the archive cannot be read or holds no cheat sheets.
    """
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    try:
        with tarfile.open(tar_path) as tf:
            sheets = sorted((m for m in tf.getmembers()
                             if m.isfile() and re.fullmatch(r"[^/]+/cheat/cheatsheets/[^/]+", m.name)),
                            key=lambda m: m.name)
            for member in sheets:
                tool = member.name.rsplit("/", 1)[1]
                if tool in NOT_COMMAND_SHEETS:
                    continue
                f = tf.extractfile(member)
                assert f is not None
                for record in parse_cheatsheet(f.read().decode("utf-8", errors="replace"), tool=tool):
                    key = (record["instruction"], record["output"])
                    if key not in seen:
                        seen.add(key)
                        records.append(record)
    except tarfile.TarError as e:
        raise DataError(f"{tar_path.name}: not a readable tar archive ({e})") from None
    if not sheets:
        raise DataError(f"{tar_path.name}: no files under cheat/cheatsheets/", "is this the cheat sdist?")
    return records


@register_dataset(
    "shell-commands",
    description="~1.2k 'how do I ...' -> shell command pairs from the cheat sheets of cheat 2.5.1 "
                "(generation: short instruction -> one command)",
    format="alpaca", license="MIT OR GPL-3.0 (cheat, dual-licensed)",
    source="PyPI sdist cheat==2.5.1, cheat/cheatsheets/*", version=3)
def _shell_commands(workdir: Path) -> list[Record]:
    # A sheet's comments assume its tool ("To list profiles loaded" is about apparmor), so the question names it,
    # as `cheat TOOL` does: without it many answers are guesses between tools.
    return [{**r, "instruction": f"{r['instruction']} (using {r['tool']})"}
            for r in parse_cheat_sdist(download.pip_download("cheat==2.5.1", workdir, sdist=True))]


def read_cheat_sheets(tar_path: Path) -> list[Record]:
    """Every command sheet of a cheat sdist as one text record {"text", "file"} (file: `cheatsheets/TOOL`), for a
    knowledge base (`lmtailor kb build catalog:cheat-sheets`); the same sheets `shell-commands` is made from."""
    try:
        with tarfile.open(tar_path) as tf:
            sheets = sorted((m for m in tf.getmembers()
                             if m.isfile() and re.fullmatch(r"[^/]+/cheat/cheatsheets/[^/]+", m.name)),
                            key=lambda m: m.name)
            records = []
            for member in sheets:
                f = tf.extractfile(member)
                assert f is not None
                text = f.read().decode("utf-8", errors="replace")
                if text.strip():
                    records.append({"text": text, "file": "cheatsheets/" + member.name.rsplit("/", 1)[1]})
    except tarfile.TarError as e:
        raise DataError(f"{tar_path.name}: not a readable tar archive ({e})") from None
    if not records:
        raise DataError(f"{tar_path.name}: no files under cheat/cheatsheets/", "is this the cheat sdist?")
    return records


@register_dataset(
    "cheat-sheets",
    description="the 194 cheat sheets of cheat 2.5.1 as text, one per record (a knowledge base for the "
                "shell-commands questions: it holds their answers)",
    format="text", license="MIT OR GPL-3.0 (cheat, dual-licensed)",
    source="PyPI sdist cheat==2.5.1, cheat/cheatsheets/*")
def _cheat_sheets(workdir: Path) -> list[Record]:
    return read_cheat_sheets(download.pip_download("cheat==2.5.1", workdir, sdist=True))
