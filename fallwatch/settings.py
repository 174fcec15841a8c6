"""The one settings model of fallwatch.

Sources, highest priority first:
1. environment variables `FALLWATCH_<SECTION>__<FIELD>` (e.g. `FALLWATCH_KAFKA__BOOTSTRAP_SERVERS`);
2. the YAML file named by `FALLWATCH_CONFIG` (or `fallwatch --config FILE`);
3. the addresses of the local stack started by `fallwatch stack up` (its `stack.json`);
4. the defaults below.

`config/fallwatch.example.yaml` documents every field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from schemas import Topics

CONFIG_ENV = "FALLWATCH_CONFIG"
STATE_DIR_ENV = "FALLWATCH_STATE_DIR"


class ConfigError(Exception):
    """A user mistake in configuration or on the command line; shown as one readable line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    bootstrap_servers: str = "localhost:9092"
    topics: Topics = Topics()
    partitions: int = Field(4, ge=1, description="partitions of each topic created by fallwatch")
    frames_retention_hours: float = Field(
        24.0, gt=0, description="retention of the `frames` topic: residents' images, keep it short"
    )


class RedisSettings(Section):
    url: str = "redis://localhost:6379/0"


class CameraSettings(Section):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    room: str = Field(min_length=1)
    url: str = Field(min_length=1, description="video file path, rtsp://, http(s):// or /dev/videoN")
    fps: float = Field(2.0, gt=0, le=30, description="target sampling rate")
    jpeg_quality: int = Field(85, ge=10, le=100)
    loop: bool = False
    realtime: bool = Field(True, description="play a video file back at its own speed, like a live camera")
    enabled: bool = True


class ProducerSettings(Section):
    cameras: list[CameraSettings] = Field(default_factory=list)

    @field_validator("cameras")
    @classmethod
    def unique_ids(cls, cameras: list[CameraSettings]) -> list[CameraSettings]:
        seen: set[str] = set()
        for camera in cameras:
            if camera.id in seen:
                raise ValueError(f"duplicate camera id {camera.id!r}")
            seen.add(camera.id)
        return cameras


DEFAULT_QUESTION = "Is the person falling or lying on the floor?"


class EdgeSettings(Section):
    model: str = Field("dandelin/vilt-b32-finetuned-vqa", description="hub id or local directory")
    revision: str | None = None
    question: str = DEFAULT_QUESTION
    group_id: str = "fallwatch-edge"
    batch_size: int = Field(8, ge=1)
    batch_wait_ms: int = Field(50, ge=0)
    switcher_registry: Path = Field(Path("models/switchers"), description="directory of switcher versions")
    decision_threshold: float = Field(0.5, ge=0, le=1, description="P(fall) at or above which a frame is a fall")
    clip_frames: int = Field(8, ge=1, description="frames in the clip sent with an offloaded frame")
    clip_seconds: float = Field(4.0, gt=0, description="the clip covers at most this much recent time")
    clip_ttl_s: int = Field(300, ge=1, description="TTL of clip JPEGs in Redis (claim check)")
    cloud_deadline_s: float = Field(15.0, gt=0, description="after this a cloud answer is no longer useful")
    max_frame_bytes: int = Field(4_000_000, ge=1)


class CloudSettings(Section):
    model: str = Field("llava-hf/LLaVA-NeXT-Video-7B-hf", description="hub id or local directory")
    revision: str | None = None
    question: str = DEFAULT_QUESTION
    group_id: str = "fallwatch-cloud"
    num_frames: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    batch_wait_ms: int = Field(100, ge=0)
    decision_threshold: float = Field(0.5, ge=0, le=1, description="P(fall) at or above which a clip is a fall")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:0'…")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class AlertingSettings(Section):
    app_id: str = "fallwatch-alerting"
    k: int = Field(3, ge=1, description="falls among the last n final verdicts that confirm a fall")
    n: int = Field(5, ge=1)
    window_s: float = Field(30.0, gt=0, description="verdicts older than this do not count towards k of n")
    cooldown_s: float = Field(60.0, ge=0, description="no new alert for a camera this long after its last")

    @model_validator(mode="after")
    def k_at_most_n(self) -> AlertingSettings:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self


class DmdSettings(Section):
    output: Path = Path("dmd-data/replay.jsonl")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FALLWATCH_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(Path(".fallwatch"), description="pids, logs and data of the local stack")
    cache_dir: Path = Field(Path(".cache"), description="downloaded Kafka jars")
    log_level: str = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    producers: ProducerSettings = ProducerSettings()
    edge: EdgeSettings = EdgeSettings()
    cloud: CloudSettings = CloudSettings()
    alerting: AlertingSettings = AlertingSettings()
    dmd: DmdSettings = DmdSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get(CONFIG_ENV)
        if config:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config))
        sources.append(LocalStackSource(settings_cls))
        return tuple(sources)


class LocalStackSource(PydanticBaseSettingsSource):
    """Kafka and Redis addresses of the stack `fallwatch stack up` started, when one is running."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        state_file = Path(os.environ.get(STATE_DIR_ENV, ".fallwatch")) / "stack.json"
        if not state_file.is_file():
            return {}
        state = json.loads(state_file.read_text())
        return {
            "kafka": {"bootstrap_servers": f"127.0.0.1:{state['kafka']['port']}"},
            "redis": {"url": f"redis://127.0.0.1:{state['redis']['port']}/0"},
        }


def load_settings(**overrides: Any) -> Settings:
    """Settings from all sources; a mistake becomes one ConfigError listing each problem."""
    config = os.environ.get(CONFIG_ENV)
    if config and not Path(config).is_file():
        raise ConfigError(f"config file {config} does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
