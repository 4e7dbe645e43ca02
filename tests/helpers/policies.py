"""A scripted toy-env solver that reads only the conversation (any prompt layout: full or windowed). It decides from
the latest observation's list of available actions, which the toy env always gives."""


def toy_solver(conversation: str) -> str:
    item = "key" if "Find the key" in conversation else "coin"
    available = conversation.rsplit("Available actions:", 1)[-1].split("\n", 1)[0].split("<|", 1)[0]
    actions = {a.strip() for a in available.split(",")}
    if f"drop {item}" not in actions:  # not carrying it yet
        return (
            f"The {item} is here. <action>take {item}</action>"
            if f"take {item}" in actions
            else ("Keep looking. <action>go east</action>")
        )
    if item == "key":
        return "<action>open door</action>" if "open door" in actions else "<action>go east</action>"
    return "<action>drop coin</action>" if "go west" not in actions else "Back west. <action>go west</action>"


def garbage_policy(conversation: str) -> str:
    """Never writes a parsable action: every turn is invalid."""
    return "I refuse to use tags; go east! <act>go east"
