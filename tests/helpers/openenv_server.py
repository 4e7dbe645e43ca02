"""A small OpenEnv environment served by the `openenv` package's own server classes, for the adapter tests:
``python -m helpers.openenv_server --port N [--step-delay S]`` serves it on 127.0.0.1 (WebSocket sessions).

The key-and-door env: "take key", then "open door" wins (reward 1, done); any other message is answered with the
room's description and a hint. "wait" sleeps `--step-delay` seconds first (a slow step)."""

import argparse
import time
from typing import Any

from openenv.core.env_server.http_server import create_fastapi_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field


ROOM = "You are in a small room. A door is locked; a key lies on the floor."
STEP_DELAY = 0.0


class DoorAction(Action):
    message: str = Field(..., description="What the agent does")


class DoorObservation(Observation):
    text: str = Field(default="", description="What the agent sees")
    has_key: bool = Field(default=False)


class DoorEnvironment(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state = State(episode_id="0", step_count=0)
        self.has_key = False

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> DoorObservation:
        self._state = State(episode_id=episode_id or f"seed-{seed}", step_count=0)
        self.has_key = False
        return DoorObservation(text=ROOM, done=False, reward=0.0)

    def step(self, action: DoorAction, timeout_s: float | None = None, **kwargs: Any) -> DoorObservation:
        self._state.step_count += 1
        message = " ".join(action.message.lower().split())
        if message == "wait":
            time.sleep(STEP_DELAY)
        if message == "take key":
            self.has_key = True
            return DoorObservation(text="You take the key.", has_key=True, reward=0.0)
        if message == "open door" and self.has_key:
            return DoorObservation(text="The door opens. You are free!", has_key=True, done=True, reward=1.0)
        return DoorObservation(text=ROOM + " Try 'take key' or 'open door'.", has_key=self.has_key, reward=0.0)

    @property
    def state(self) -> State:
        return self._state


def main():
    global STEP_DELAY
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    STEP_DELAY = args.step_delay
    import uvicorn

    app = create_fastapi_app(DoorEnvironment, DoorAction, DoorObservation, max_concurrent_envs=16)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
