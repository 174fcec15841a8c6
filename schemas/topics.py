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
    person_down: str = "person-down"
    operator_events: str = "operator-events"

    def prefixed(self, prefix: str) -> "Topics":
        """These topics under `prefix.` (a run of the demo, a test, a benchmark keeps its records apart)."""
        return Topics(**{name: f"{prefix}.{value}" for name, value in self.model_dump().items()})

    def all(self) -> list[str]:
        return [
            self.frames,
            self.cloud_requests,
            self.verdicts,
            self.fall_events,
            self.dead_letters,
            self.labels,
            self.person_down,
            self.operator_events,
        ]
