"""Default topic names; every name is configurable (settings: kafka.topics)."""

from pydantic import BaseModel, ConfigDict


class Topics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frames: str = "frames"
    cloud_requests: str = "cloud-requests"
    verdicts: str = "verdicts"
    fall_events: str = "fall-events"
    dead_letters: str = "dead-letters"
    labels: str = "labels"

    def all(self) -> list[str]:
        return [self.frames, self.cloud_requests, self.verdicts, self.fall_events, self.dead_letters, self.labels]
