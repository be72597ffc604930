"""Read HistoryAgent checkpoints (or a plain text corpus) and render the memory as the agent's prompt shows it.

Layout: ``<root>/checkpoints/ep_NNNNNN/{runtime.json, agent.json, memory_N.jsonl}`` plus a ``latest`` symlink
and/or ``latest.json`` pointer. ``checkpoint_dir`` may be the root, its ``checkpoints`` dir, ``latest``, or
one ``ep_*`` dir. A ``.txt``/``.md`` file is read as a corpus.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ENTRY_TYPES = ("Observation", "Action", "Feedback")
DEFAULT_HISTORY_INSTRUCTIONS = (
    "You remember your previous experiences. Use them to answer: they are facts you have learned."
)
DEFAULT_TEMPLATE = "{system_prompt}\n\n{instructions}\nHere is a list of your previous experiences:\n{experiences}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file (and line)."""


# How the memory is laid out in front of the question (``memory_layout``):
#   system         this project's: instructions and every experience in one system prompt (``history_template``)
#   history_lines  the research workflow's first HistoryAgent: its system prompt, then one user turn holding
#                  "TYPE: content" lines joined by blank lines and the question as "Q: ..."
#   history_chat   its later HistoryAgent: its system prompt, then the experiences as chat turns (Observation and
#                  Feedback from the user, Action from the assistant) and the question as the last user turn
MEMORY_LAYOUTS = ("system", "history_lines", "history_chat")
_CHAT_ROLE = {"Observation": "user", "Action": "assistant", "Feedback": "user"}


@dataclass
class MemoryEntry:
    type: str
    content: str
    index: int  # position in the memory file
    raw: str | dict | None = None  # the content as the file holds it (a dict stays a dict)

    def render(self) -> str:
        return f"{self.type.upper()}: {self.content}"

    def as_their_agent_writes(self) -> str:
        """The content as the research workflow's HistoryAgent puts it in a prompt (``str()`` of a dict)."""
        return str(self.content if self.raw is None else self.raw)


@dataclass(frozen=True)
class MemoryContext:
    """The memory in front of a question: leading messages, and text put before the question in its own turn."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    question_prefix: str = ""

    @property
    def system(self) -> str | None:
        return next((c for r, c in self.messages if r == "system"), None)

    def conversation(self, question: str) -> list[dict]:
        turns = [{"role": r, "content": c} for r, c in self.messages]
        return turns + [{"role": "user", "content": self.question_prefix + question}]

    def to_json(self) -> dict:
        return {"messages": [list(m) for m in self.messages], "question_prefix": self.question_prefix}

    @classmethod
    def from_json(cls, d) -> MemoryContext:
        """From :meth:`to_json`, a plain system prompt string, or None (no memory, no system message)."""
        if d is None:
            return cls(())
        if isinstance(d, str):
            return cls((("system", d),))
        return cls(tuple((r, c) for r, c in d["messages"]), d.get("question_prefix", ""))


@dataclass
class AgentMemory:
    source: str
    episode: str | None
    system_prompt: str
    history_k: int | None
    entries: list[MemoryEntry]
    skipped_lines: int = 0
    warnings: list[str] = field(default_factory=list)
    is_corpus: bool = False

    def render(
        self,
        entries: list[MemoryEntry] | None = None,
        *,
        template: str = DEFAULT_TEMPLATE,
        instructions: str = DEFAULT_HISTORY_INSTRUCTIONS,
    ) -> str:
        """The teacher's system prompt: the agent's system prompt, instructions and the experiences."""
        entries = self.entries if entries is None else entries
        if self.is_corpus:
            body = "\n".join(e.content for e in entries)
            return f"{self.system_prompt}\n\n{body}" if self.system_prompt else body
        return template.format(
            system_prompt=self.system_prompt,
            instructions=instructions,
            experiences="\n".join(e.render() for e in entries),
        )

    def context(
        self,
        entries: list[MemoryEntry] | None = None,
        *,
        layout: str = "system",
        template: str = DEFAULT_TEMPLATE,
        instructions: str = DEFAULT_HISTORY_INSTRUCTIONS,
    ) -> MemoryContext:
        """The memory (or ``entries`` of it) laid out as ``layout`` (one of ``MEMORY_LAYOUTS``)."""
        if layout == "system" or self.is_corpus:
            return MemoryContext((("system", self.render(entries, template=template, instructions=instructions)),))
        if layout not in MEMORY_LAYOUTS:
            raise ValueError(f"memory_layout {layout!r}: expected one of {MEMORY_LAYOUTS}")
        entries = self.entries if entries is None else entries
        lead = (("system", self.system_prompt),) if self.system_prompt else ()
        if layout == "history_lines":
            lines = [f"{e.type.upper()}: {e.as_their_agent_writes()}" for e in entries]
            return MemoryContext(lead, "".join(f"{line}\n\n" for line in lines) + "Q: ")
        turns = tuple((_CHAT_ROLE[e.type], e.as_their_agent_writes()) for e in entries)
        return MemoryContext(lead + turns)

    def triples(self) -> list[list[MemoryEntry]]:
        """Group entries into experiences: an Observation and the Actions/Feedback that follow it; in a corpus,
        the units its structure gives (see :func:`corpus_sections`)."""
        if self.is_corpus:
            return corpus_sections(self.entries)
        groups: list[list[MemoryEntry]] = []
        for e in self.entries:
            if e.type == "Observation" or not groups:
                groups.append([e])
            else:
                groups[-1].append(e)
        return groups


def _is_heading(entry: MemoryEntry) -> bool:
    return entry.content.startswith("#")


def corpus_sections(entries: list[MemoryEntry]) -> list[list[MemoryEntry]]:
    """A corpus's paragraphs grouped as its Markdown sections: a heading and the paragraphs under it (headings
    with nothing under them join the next section); a text without headings, one paragraph each. Self-study
    chunks and their split keys count these units, so a chunk never starts inside a section."""
    if not any(_is_heading(e) for e in entries):
        return [[e] for e in entries]
    groups: list[list[MemoryEntry]] = []
    for e in entries:
        if not groups or (_is_heading(e) and not all(_is_heading(x) for x in groups[-1])):
            groups.append([e])
        else:
            groups[-1].append(e)
    return groups


def section_title(group: list[MemoryEntry]) -> str:
    """The heading a corpus section is known by (its last heading line, without the #s)."""
    heads = [e.content.splitlines()[0].lstrip("#").strip() for e in group if _is_heading(e)]
    return heads[-1] if heads else "this passage"


def memory_questions(memory: AgentMemory) -> list[tuple[int, str, str]]:
    """(entry index, question, reference answer) for experiences whose Feedback carries the answer."""
    out = []
    for i, group in enumerate(memory.triples()):
        fb = [e.content for e in group if e.type == "Feedback"]
        if group[0].type == "Observation" and fb:
            out.append((i, group[0].content, fb[-1]))
    return out


def unit_text(group: list[MemoryEntry], is_corpus: bool) -> str:
    """A unit's own text, as a recital states it: a corpus section's paragraphs (not its headings), or an
    experience's entries as the memory renders them."""
    if is_corpus:
        return "\n\n".join(e.content for e in group if not _is_heading(e))
    return "\n".join(e.render() for e in group)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# titles and the like whose period does not end a sentence ("Dr. Amara Okafor"), lowercased, without the period
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "prof", "st", "mt", "jr", "sr", "vs", "e.g", "i.e"}


def split_sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` that a space follows, except after a title ("Dr.") or an
    initial ("J.")."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        last = out[-1].rsplit(" ", 1)[-1] if out else ""
        if last.endswith(".") and (last[:-1].lower() in _ABBREVIATIONS or (len(last) == 2 and last[0].isupper())):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


_LABEL = re.compile(r"^[A-Z][\w ]{0,30}:\s+")  # "Task: ", "Please remember this: "


def _strings(value) -> list[str]:
    """The text a value holds: a string itself, or every string inside a dict or list (a tool result)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def unit_sentences(group: list[MemoryEntry], is_corpus: bool, min_chars: int = 20) -> list[str]:
    """The whole sentences of a unit's text, in order: pieces that end in ``.``, ``!`` or ``?`` and hold at least
    ``min_chars`` characters (log lines and one-word replies are not sentences), without a leading label
    ("Task: "). A structured entry (a JSON tool result) gives the sentences of its string values; a corpus's
    headings give none."""
    out = []
    for e in group:
        if is_corpus and _is_heading(e):
            continue
        value = e.raw if isinstance(e.raw, dict | list) else _maybe_json(e.content)
        for text in _strings(value):
            for line in text.splitlines():
                pieces = (_LABEL.sub("", s) for s in split_sentences(line))
                out += [s for s in pieces if len(s) >= min_chars and s[-1] in ".!?"]
    return out


def _maybe_json(text: str):
    if text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def sample_question(memory: AgentMemory) -> str:
    """A question to try a cartridge of this memory with: its first Observation, or a corpus's first section
    asked about by its heading."""
    groups = memory.triples()
    if memory.is_corpus:
        titled = [g for g in groups if any(_is_heading(e) for e in g)]
        return f"What does the text say about {section_title(titled[0])}?" if titled else "What does the text say?"
    asked = [g[0].content for g in groups if g[0].type == "Observation"]
    return asked[0] if asked else "What do you remember?"


@dataclass(frozen=True)
class Fact:
    """A fact of a memory with a known answer (``facts.json`` beside the checkpoint): the memory's own question
    about it (None where the memory asks none) and questions phrased otherwise, which no training prompt holds."""

    entry: int
    answer: str
    question: str | None
    heldout: tuple[str, ...]
    value: str | None = None  # the part of ``answer`` a question asks for ("Room 4C"): what recall checks


FACTS_FILE = "facts.json"


def read_facts(checkpoint_dir: str | Path) -> list[Fact] | None:
    """The ``facts.json`` of a checkpoint (in its root, or beside a corpus file); None when it has none."""
    path = Path(checkpoint_dir).resolve()
    for d in [path if path.is_dir() else path.parent, *list(path.parents)[:3]]:
        f = d / FACTS_FILE
        if f.is_file():
            break
    else:
        return None
    try:
        return [
            Fact(int(x["entry"]), x["answer"], x.get("question"), tuple(x.get("heldout") or ()), x.get("value"))
            for x in json.loads(f.read_text(encoding="utf-8"))
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{f}: expected a list of {{entry, answer, value, question, heldout}} ({err})") from None


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def resolve_episode_dir(path: Path) -> Path:
    """The ``ep_*`` directory a ``checkpoint_dir`` points at (latest where it names a root)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint_dir {path} does not exist")
    if path.name.startswith("ep_") and path.is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if path.name == "latest":
        return path.resolve()
    link = root / "latest"
    if link.exists():
        return link.resolve()
    pointer = root / "latest.json"
    if pointer.is_file():  # the research workflow writes {"path": ...}; earlier releases here {"latest": ...}
        try:
            d = json.loads(pointer.read_text())
            target = d["path"] if "path" in d else d["latest"]
            if not isinstance(target, str):
                raise TypeError(f"the pointer is {type(target).__name__}, not a string")
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f'{pointer}: expected {{"path": "ep_NNNNNN"}} ({err})') from None
        ep = root / target if not Path(target).is_absolute() else Path(target)
        if not ep.is_dir():
            raise CheckpointError(f"{pointer}: points at {target!r}, which is not a directory under {root}")
        return ep
    eps = sorted(p for p in root.glob("ep_*") if p.is_dir())
    if not eps:
        raise CheckpointError(f"{path}: no ep_* checkpoint directories, no latest pointer")
    return eps[-1]


_FILE_PROMPT = re.compile(r"^\{file:(.+)\}$")


def resolve_file_prompt(value, agent_file: Path, checkpoint_dir: Path):
    """A ``{file:prompts/x.txt}`` prompt (the research workflow's agent configs) as the file's text, looked up
    beside agent.json, then under the checkpoint directory and its parent; other values as they are."""
    m = _FILE_PROMPT.match(value) if isinstance(value, str) else None
    if not m:
        return value
    rel = Path(m.group(1).strip())
    bases = [agent_file.parent, checkpoint_dir, checkpoint_dir.parent]
    tried = [rel] if rel.is_absolute() else [b / rel for b in bases]
    for cand in tried:
        if cand.is_file():
            return read_utf8(cand)
    raise CheckpointError(
        f"{agent_file}: agent_config.system_prompt {value!r} names a file that is not there (tried "
        + ", ".join(str(c) for c in tried)
        + ")"
    )


def read_utf8(path: Path) -> str:
    """A checkpoint file's text; bytes that are not UTF-8 are a CheckpointError naming the file and the offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}: {err.reason})"
        ) from None


def memory_files(ep: Path, snapshot: str | None, agent_file: Path) -> list[Path]:
    """The memory file agent.json names (``memory_snapshot_path``; a path written on another machine is looked
    up by its name in the episode directory), else every ``memory_N.jsonl`` of the episode."""
    if snapshot:
        for cand in (ep / snapshot, Path(snapshot), ep / Path(snapshot).name):
            if cand.is_file():
                return [cand]
        raise CheckpointError(f"{agent_file}: memory_snapshot_path {snapshot!r} is not a file in {ep}")
    files = sorted(ep.glob("memory_*.jsonl"))
    if not files:
        raise CheckpointError(f"{ep}: no memory_N.jsonl file")
    return files


def read_memory(checkpoint_dir: str | Path, *, strict: bool = False) -> AgentMemory:
    """Read the memory of a checkpoint (or a text corpus); malformed lines fail (strict) or are skipped and counted."""
    path = Path(checkpoint_dir)
    if path.is_file():
        text = read_utf8(path)
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not paras:
            raise CheckpointError(f"{path}: corpus is empty")
        entries = [MemoryEntry("Text", p, i) for i, p in enumerate(paras)]
        return AgentMemory(str(path), None, "", None, entries, is_corpus=True)
    ep = resolve_episode_dir(path)
    agent_file = ep / "agent.json"
    if not agent_file.is_file():
        raise CheckpointError(f"{ep}: missing agent.json")
    try:
        agent = json.loads(read_utf8(agent_file))
        acfg = agent.get("agent_config", {})
        system_prompt = resolve_file_prompt(acfg.get("system_prompt", ""), agent_file, path)
        history_k = acfg.get("history_k")
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{agent_file}: not a valid agent.json ({err})") from None
    if not isinstance(system_prompt, str):
        raise CheckpointError(f"{agent_file}: agent_config.system_prompt must be a string")
    mem_files = memory_files(ep, agent.get("memory_snapshot_path"), agent_file)
    entries, skipped, warnings = [], 0, []
    for mf in mem_files:
        for n, line in enumerate(read_utf8(mf).splitlines(), 1):
            if not line.strip():
                continue
            problem = None
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"{mf}:{n}: not valid JSON ({err.msg})"
            else:
                if not isinstance(rec, dict) or "type" not in rec or "content" not in rec:
                    problem = f"{mf}:{n}: a memory line needs 'type' and 'content'"
                elif rec["type"] not in ENTRY_TYPES:
                    problem = f"{mf}:{n}: unknown entry type {rec['type']!r} (expected one of {ENTRY_TYPES})"
                elif not isinstance(rec["content"], (str, dict)):
                    problem = f"{mf}:{n}: content must be a string or an object"
            if problem:
                if strict:
                    raise CheckpointError(problem)
                skipped += 1
                warnings.append(problem)
                logger.warning("skipped %s", problem)
                continue
            entries.append(MemoryEntry(rec["type"], _content_text(rec["content"]), len(entries), rec["content"]))
    if not entries:
        raise CheckpointError(f"{ep}: the memory is empty ({skipped} malformed lines skipped)")
    return AgentMemory(str(path), ep.name, system_prompt, history_k, entries, skipped, warnings)
