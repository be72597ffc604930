"""Write the development set of memories in examples/dev_memories/ (run once; output committed).

Four synthetic memories of different kinds and sizes, each with facts whose answers are known, so that recall
can be scored, and with questions phrased unlike the memory's own (held out: never in a training prompt):

  team_qa        a Q/A agent for a work team: \\boxed{} answers, Correct/Incorrect feedback (HistoryAgent)
  assistant_log  a personal assistant's dialogue log with its user, facts told in passing (HistoryAgent)
  tool_agent     a tool-using agent's tasks, tool calls and tool results (dict contents) (HistoryAgent)
  documents      a plain document corpus (Markdown) about the facilities of a town

Each holds ``facts.json``: ``[{"entry", "answer", "value", "question", "heldout"}]`` where ``value`` is the part of
the answer a question asks for (what recall checks), ``question`` is the memory's
own phrasing (None where the memory asks none) and ``heldout`` the other phrasings. The bundled demo memory
(examples/agent_checkpoint) gets its ``facts.json`` here too and is the fifth member of the set.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_example_checkpoint import write_checkpoint  # noqa: E402

# attribute: (statement, the memory's question, a held-out phrasing, values); {e} an entity, {v} its value
ATTRS = {
    "lead": ("{E} is led by {v}.", "Who leads {e}?", "Which person is in charge of {e}?"),
    "room": ("{E} takes place in {v}.", "Where does {e} take place?", "In which room is {e} held?"),
    "day": ("{E} happens every {v}.", "On which day is {e}?", "What day of the week is {e} on?"),
    "time": ("{E} starts at {v}.", "What time does {e} start?", "When does {e} begin?"),
    "code": ("The access code for {e} is {v}.", "What is the access code for {e}?", "Which code opens {e}?"),
    "ext": (
        "The phone extension for {e} is {v}.",
        "What is the phone extension for {e}?",
        "Which number do I dial to reach {e}?",
    ),
    "seats": ("{E} has {v} seats.", "How many seats does {e} have?", "What is the seating capacity of {e}?"),
    "year": ("{E} opened in {v}.", "When did {e} open?", "In what year was {e} first opened?"),
}
VALUES = {
    "lead": [
        "Priya Nair",
        "Jonas Weber",
        "Aiko Tanaka",
        "Carlos Mendes",
        "Fatima Zahra",
        "Liam O'Connor",
        "Sofia Rossi",
        "Kwame Mensah",
        "Elena Petrova",
        "Noah Fischer",
        "Mei Lin",
        "Omar Haddad",
    ],
    "room": ["Room 4C", "the Birch Room", "Hall 2", "the rooftop lounge", "Lab 7", "the Cedar Room", "Room 118"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "time": ["8:15 am", "9:40 am", "11:30 am", "1:45 pm", "3:20 pm", "4:50 pm", "7:10 pm"],
    "code": ["4417", "9032", "2868", "7153", "6604", "3391", "5280"],
    "ext": ["212", "347", "408", "561", "629", "735", "894"],
    "seats": ["12", "24", "36", "48", "60", "85", "140"],
    "year": ["1987", "1994", "2003", "2011", "2016", "2019", "2022"],
}
KIND_ATTRS = {
    "team_qa": ["lead", "room", "day", "time", "ext"],
    "assistant_log": ["room", "day", "time", "code", "lead"],
    "tool_agent": ["code", "ext", "lead", "room", "year"],
    "documents": ["lead", "year", "seats", "time", "ext", "day"],
}
ENTITIES = {
    "team_qa": [
        "the weekly design review",
        "the budget meeting",
        "the onboarding session",
        "the release retro",
        "the security briefing",
        "the customer demo",
        "the hiring sync",
        "the sprint planning",
        "the data council",
        "the all-hands meeting",
    ],
    "assistant_log": [
        "my pottery class",
        "my book club",
        "the kids' swim lesson",
        "my physio appointment",
        "the neighbourhood meeting",
        "my Spanish course",
        "the choir rehearsal",
        "my volunteer shift",
        "the climbing gym session",
        "my tax advisor meeting",
    ],
    "tool_agent": [
        "the billing service",
        "the staging cluster",
        "the analytics database",
        "the build farm",
        "the payments gateway",
        "the search index",
        "the mail relay",
        "the backup vault",
        "the metrics pipeline",
        "the auth service",
    ],
    "documents": [
        "the Harbour Library",
        "the Eastside Pool",
        "the Old Mill Theatre",
        "the Community Kitchen",
        "the Riverside Clinic",
        "the Town Archive",
        "the Youth Workshop",
        "the Northgate Museum",
        "the Market Hall",
        "the Glasshouse Gardens",
        "the Fire Station Cafe",
        "the Lantern Cinema",
        "the Quarry Climbing Wall",
        "the Seaview Hostel",
        "the Tidewater Aquarium",
        "the Ferry Terminal",
        "the Allotment Society",
        "the Printworks Studio",
        "the Cathedral Bookshop",
        "the Skate Park",
        "the Observatory Hill Centre",
        "the Canal Boat Club",
        "the Saltmarsh Reserve",
        "the Drill Hall",
    ],
}
SYSTEM = {
    "team_qa": "You are Atlas, the assistant of the Orbit product team. Answer the team's questions; put your "
    "final answer in \\boxed{}.",
    "assistant_log": "You are Juniper, a personal assistant. Keep track of what your user tells you and help them.",
    "tool_agent": "You are Relay, an operations agent. You solve tasks about the company's systems with tools.",
}
CHAT = [  # unrelated turns of the assistant log (observation, reply)
    ("Can you suggest a quick dinner?", "A vegetable stir-fry with rice takes about twenty minutes."),
    ("What's a good stretch for a stiff back?", "Try a slow cat-cow stretch, ten times, morning and evening."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and put screens away an hour before sleep."),
    ("How do I get wine out of a shirt?", "Blot it, then rinse with cold water and a little dish soap."),
    ("Recommend a board game for four people.", "Ticket to Ride is easy to learn and plays well with four."),
    ("How long should I boil an egg?", "About nine minutes for a firm yolk, then cool it in cold water."),
]
LOG_LINES = [  # tool output noise of the tool agent
    "INFO  scheduler: heartbeat ok (lag 3 ms)",
    "INFO  cache: 1822 hits, 37 misses in the last minute",
    "WARN  disk /var: 71% used",
    "INFO  deploy: no pending rollouts",
    "DEBUG gc: pause 4 ms",
    "INFO  queue depth 12, consumers 4",
    "INFO  tls: certificate valid for 61 more days",
]
FILLER = [  # background sentences of the documents
    "Visitors are asked to leave bicycles in the racks by the main entrance.",
    "The building was renovated with help from local volunteers and a regional grant.",
    "Large groups are welcome but should call ahead so that staff can prepare.",
    "A noticeboard near the door lists events for the coming month.",
    "The site is step-free and has an accessible toilet on the ground floor.",
    "Dogs on a lead are allowed in the garden but not inside the building.",
    "Parking is limited, so the town council recommends the number 4 bus.",
    "Lost property is kept at the front desk for two weeks.",
    "Opening hours change during school holidays, and the website has the current times.",
    "The cafe corner serves tea, coffee and soup made from vegetables of the town's allotments.",
    "Photography is allowed for personal use, but tripods need permission from the staff.",
    "Several rooms can be hired for private events at a reduced rate for local charities.",
    "The staff run a short guided tour on the first Sunday of each month.",
    "A small shop sells postcards, maps and books by local authors.",
    "In winter the heating is turned down after six, so visitors may want to bring a jumper.",
    "Feedback forms are collected each month and discussed at the town council's open meeting.",
]


def make_facts(kind: str, n: int, rng: random.Random) -> list[dict]:
    pairs = [(e, a) for e in ENTITIES[kind] for a in KIND_ATTRS[kind]]
    rng.shuffle(pairs)
    facts = []
    for e, a in pairs[:n]:
        statement, question, heldout = ATTRS[a]
        v = rng.choice(VALUES[a])
        sub = {"e": e, "E": e[0].upper() + e[1:], "v": v}
        facts.append(
            {
                "entity": e,
                "value": v,
                "answer": statement.format(**sub),
                "question": question.format(**sub),
                "heldout": [heldout.format(**sub)],
            }
        )
    return facts


def team_qa(facts, rng) -> list[dict]:
    lines = []
    for f in facts:
        right = rng.random() < 0.5
        guess = f["value"] if right else rng.choice([v for v in _values_of(f) if v != f["value"]])
        lines += [
            {"type": "Observation", "content": f"{f['question']} Put your final answer in \\boxed{{}}."},
            {"type": "Action", "content": f"\\boxed{{{guess}}}"},
            {"type": "Feedback", "content": ("Correct. " if right else "Incorrect. ") + f["answer"]},
        ]
        f["question"] = lines[-3]["content"]
    return lines


def assistant_log(facts, rng) -> list[dict]:
    lines, chat = [], list(CHAT)
    for i, f in enumerate(facts):
        lines += [
            {"type": "Observation", "content": f"Please remember this: {f['answer']}"},
            {"type": "Action", "content": f"Noted. I will remind you about {f['entity']}."},
            {"type": "Feedback", "content": "Thanks!"},
        ]
        f["question"] = None  # facts told in passing: the memory asks no question about them
        if i % 2:
            q, a = chat[(i // 2) % len(chat)]
            lines += [
                {"type": "Observation", "content": q},
                {"type": "Action", "content": a},
                {"type": "Feedback", "content": "Great, thank you."},
            ]
    return lines


def tool_agent(facts, rng) -> list[dict]:
    lines = []
    for f in facts:
        slug = f["entity"].removeprefix("the ").replace(" ", "-")
        noise = "\n".join(rng.sample(LOG_LINES, 4))
        lines += [
            {"type": "Observation", "content": f"Task: {f['question']}"},
            {"type": "Action", "content": f'search_docs(query="{f["entity"]}", space="ops")'},
            {
                "type": "Feedback",
                "content": {
                    "message": f["answer"],
                    "tool": "search_docs",
                    "source": f"wiki/ops/{slug}",
                    "log": noise,
                    "score": 1,
                },
            },
        ]
        f["question"] = lines[-3]["content"]
    return lines


def documents(facts, rng) -> str:
    by_entity: dict[str, list[dict]] = {}
    for f in facts:
        by_entity.setdefault(f["entity"], []).append(f)
    parts = ["# A guide to the town's facilities\n"]
    for e in ENTITIES["documents"]:
        sentences = [f["answer"] for f in by_entity.get(e, [])] + rng.sample(FILLER, 15)
        rng.shuffle(sentences)
        parts.append(f"## {e.removeprefix('the ')}\n\n" + " ".join(sentences) + "\n")
    for f in facts:
        f["question"] = None
    return "\n".join(parts)


def _values_of(fact) -> list[str]:
    return next(vals for vals in VALUES.values() if fact["value"] in vals)


def main(out: Path) -> None:
    rng = random.Random(7)
    sizes = {"team_qa": 30, "assistant_log": 36, "tool_agent": 30, "documents": 40}
    for kind, n in sizes.items():
        facts = make_facts(kind, n, rng)
        root = out / kind
        if kind == "documents":
            root.mkdir(parents=True, exist_ok=True)
            (root / "corpus.md").write_text(documents(facts, rng))
        else:
            lines = {"team_qa": team_qa, "assistant_log": assistant_log, "tool_agent": tool_agent}[kind](facts, rng)
            write_checkpoint(root, 1, SYSTEM[kind], lines, None, "2026-12-01T00:00:00", symlink=False)
        for i, f in enumerate(facts):
            f["entry"] = i
        (root / "facts.json").write_text(
            json.dumps(
                [{k: f[k] for k in ("entry", "answer", "value", "question", "heldout")} for f in facts], indent=1
            )
            + "\n"
        )
    demo_facts(HERE / "agent_checkpoint")


# held-out phrasings of the bundled demo's 30 questions, in its order
DEMO_HELDOUT = [
    "In which container is the backup key for the generator?",
    "Which password gets me onto the station's wifi?",
    "Which doctor works at the station?",
    "On what day and at what hour does the supply boat come?",
    "Which radio channel is used in an emergency?",
    "What number of solar panels does the main roof carry?",
    "What is the station dog called?",
    "In which binder are the weather logs kept?",
    "At what temperature must the sample freezer be kept?",
    "Who is in charge of the bird survey?",
    "When is dinner in the mess hall?",
    "Which boat may be taken into the north channel?",
    "Next to which door of the lab can I find the first-aid box?",
    "Which code opens the padlock of the fuel store?",
    "How many days can the water filter go before it is replaced?",
    "Which engineer fixes the wind turbine?",
    "What call sign does the station use on the radio?",
    "In which room is wet gear dried?",
    "Which bird nests on the south cliff?",
    "How many litres of diesel does the generator burn each day?",
    "In which drawer is the satellite phone kept?",
    "Who has to approve a boat trip?",
    "What must you do to walk on the glacier?",
    "On which day is laundry done?",
    "What is the meaning of a red flag on the pier?",
    "If a GPS unit runs flat, where do I find replacement batteries?",
    "What is the cook called?",
    "Where can I use the station telescope?",
    "What depth is the harbor by the pier?",
    "Which password opens the data server?",
]


# the part of each demo answer that its held-out question asks for (what recall checks), in its order
DEMO_VALUES = [
    "blue tin",
    "heron-42-tide",
    "Amara Okafor",
    "Thursday 10 am",
    "16",
    "24",
    "Pixel",
    "green",
    "80",
    "Tomas Lindqvist",
    "6:30 pm",
    "Kestrel",
    "east",
    "7391",
    "14",
    "Lena Park",
    "Echo Seven Harbor",
    "boot room",
    "Puffins",
    "40",
    "radio room desk",
    "Ruth Ellis",
    "pairs",
    "Sunday",
    "no boats may leave",
    "drawer 3",
    "Marco Bianchi",
    "Hut D",
    "6",
    "glacier-moss-9",
]


def demo_facts(root: Path) -> None:
    sys.path.insert(0, str(HERE.parent))
    from ray_cartridges.memory import memory_questions, read_memory

    qs = memory_questions(read_memory(root))
    assert len(qs) == len(DEMO_HELDOUT) == len(DEMO_VALUES)
    facts = [
        {"entry": i, "answer": ref, "value": v, "question": q, "heldout": [h]}
        for (i, q, ref), h, v in zip(qs, DEMO_HELDOUT, DEMO_VALUES)
    ]
    (root / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")


if __name__ == "__main__":
    main(HERE / "dev_memories")
