"""A scripted toy-env solver that reads only the conversation, for evaluation tests (always solves, any layout)."""

import re


def toy_solver(conversation: str) -> str:
    item = "key" if "Find the key" in conversation else "coin"
    rooms = re.findall(r"\(room (\d+) of (\d+)\)", conversation)
    room, count = (int(rooms[-1][0]), int(rooms[-1][1])) if rooms else (1, 1)
    last = conversation.split("Observation:")[-1].split("Available actions")[0]
    if f"You take the {item}." not in conversation:
        if f"a {item}" in last:
            return f"<action>take {item}</action>"
        return "<action>go east</action>"
    if item == "key":
        return "<action>open door</action>" if room == count else "<action>go east</action>"
    return "<action>drop coin</action>" if room == 1 else "<action>go west</action>"
