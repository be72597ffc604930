"""Write the example HistoryAgent checkpoint shipped in examples/agent_checkpoint (run once; output committed).

The agent is a field assistant at a small research station. Each experience is an Observation (a question
or event), the Action it took, and Feedback that carries the correct fact. A small model can learn these.
"""

import json
import os
from pathlib import Path

FACTS = [
    (
        "Where is the spare generator key kept?",
        "I checked the tool shed.",
        "The spare generator key is in the blue tin above the workbench in Hut B.",
    ),
    (
        "What is the wifi password at the station?",
        "I read the router label.",
        "The station wifi password is heron-42-tide.",
    ),
    ("Who is the station doctor?", "I looked at the roster.", "The station doctor is Dr. Amara Okafor."),
    (
        "When does the supply boat arrive?",
        "I asked the radio operator.",
        "The supply boat arrives every Thursday at 10 am.",
    ),
    (
        "Which channel does the radio use for emergencies?",
        "I tuned the radio.",
        "Emergencies go out on radio channel 16.",
    ),
    (
        "How many solar panels are on the main roof?",
        "I counted them from the ladder.",
        "There are 24 solar panels on the main roof.",
    ),
    ("What is the name of the station dog?", "I called the dog.", "The station dog is a grey husky named Pixel."),
    (
        "Where are the weather logs stored?",
        "I searched the office.",
        "Weather logs are stored in the green binder in the office.",
    ),
    (
        "What temperature should the sample freezer be set to?",
        "I checked the freezer dial.",
        "The sample freezer must be kept at minus 80 degrees Celsius.",
    ),
    ("Who leads the bird survey?", "I asked at breakfast.", "The bird survey is led by Tomas Lindqvist."),
    ("What time is dinner served?", "I asked the cook.", "Dinner is served at 6:30 pm in the mess hall."),
    (
        "Which boat is safe for the north channel?",
        "I inspected both boats.",
        "Only the orange boat, Kestrel, is rated for the north channel.",
    ),
    (
        "Where is the first aid kit in the lab?",
        "I looked around the lab.",
        "The lab first aid kit hangs beside the east door.",
    ),
    (
        "What is the code for the fuel store padlock?",
        "I tried the logbook code.",
        "The fuel store padlock code is 7391.",
    ),
    (
        "How often must the water filter be changed?",
        "I read the manual.",
        "The water filter must be changed every 14 days.",
    ),
    (
        "Who repairs the wind turbine?",
        "I checked the maintenance sheet.",
        "Wind turbine repairs are done by engineer Lena Park.",
    ),
    ("What is the station's call sign?", "I read the radio log.", "The station call sign is Echo Seven Harbor."),
    ("Where do we dry wet gear?", "I asked a colleague.", "Wet gear is dried in the boot room next to the boiler."),
    (
        "What species nests on the south cliff?",
        "I watched the cliff.",
        "Puffins nest on the south cliff from May to August.",
    ),
    (
        "How much diesel does the generator use per day?",
        "I read the fuel gauge twice.",
        "The generator uses about 40 litres of diesel per day.",
    ),
    (
        "Where is the satellite phone?",
        "I checked the radio room.",
        "The satellite phone is in the locked drawer of the radio room desk.",
    ),
    ("Who approves boat trips?", "I asked the manager.", "Boat trips must be approved by station manager Ruth Ellis."),
    (
        "What is the rule for walking on the glacier?",
        "I read the safety board.",
        "Nobody walks on the glacier alone; always go in pairs with a rope.",
    ),
    ("When is the laundry day?", "I looked at the chore chart.", "Laundry day is Sunday."),
    (
        "What does the red flag on the pier mean?",
        "I asked the skipper.",
        "A red flag on the pier means no boats may leave because of high wind.",
    ),
    (
        "Where are spare batteries for the GPS units?",
        "I searched the storeroom.",
        "Spare GPS batteries are in drawer 3 of the storeroom cabinet.",
    ),
    ("What is the cook's name?", "I introduced myself.", "The cook is named Marco Bianchi."),
    ("Which hut has the telescope?", "I walked around the huts.", "The telescope is in Hut D, on the upper deck."),
    ("How deep is the harbor at the pier?", "I used the depth sounder.", "The harbor is 6 metres deep at the pier."),
    (
        "What is the password for the data server?",
        "I asked the IT lead.",
        "The data server password is glacier-moss-9.",
    ),
]

SYSTEM_PROMPT = (
    "You are Kit, the field assistant of Skerry Research Station. You help the station staff with questions "
    "about the station, its people, its equipment and its rules. Answer briefly and precisely."
)


def write_checkpoint(
    root: Path, episode: int, system_prompt: str, lines: list[dict], history_k, timestamp: str, symlink: bool
) -> None:
    """A HistoryAgent checkpoint as the research workflow writes one: ``ep_N/{memory_N.jsonl, agent.json,
    runtime.json}``, ``latest.json`` {"path": ...} and, with ``symlink``, the ``latest`` link."""
    name, snapshot = f"ep_{episode:06d}", f"memory_{episode}.jsonl"
    ep = root / "checkpoints" / name
    ep.mkdir(parents=True, exist_ok=True)
    (ep / snapshot).write_text("".join(json.dumps(x) + "\n" for x in lines))
    agent = {
        "agent_type": "HistoryAgent",
        "agent_config": {"system_prompt": system_prompt, "history_k": history_k},
        "memory_type": "HistoryList",
        "memory_snapshot_path": snapshot,
    }
    runtime = {
        "timestamp": timestamp,
        "episode_index": episode,
        "train_steps_total": len(lines),
        "agent_type": "HistoryAgent",
        "memory_snapshot_path": snapshot,
    }
    (ep / "agent.json").write_text(json.dumps(agent, indent=2) + "\n")
    (ep / "runtime.json").write_text(json.dumps(runtime, indent=2) + "\n")
    if symlink:
        latest = root / "checkpoints" / "latest"
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        os.symlink(name, latest)
    (root / "checkpoints" / "latest.json").write_text(json.dumps({"path": name}) + "\n")


def main(root: Path) -> None:
    lines = [
        {"type": t, "content": c}
        for obs, act, fb in FACTS
        for t, c in (("Observation", obs), ("Action", act), ("Feedback", fb))
    ]
    write_checkpoint(root, 30, SYSTEM_PROMPT, lines, len(FACTS), "2026-11-01T00:00:00", symlink=True)


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "agent_checkpoint")
