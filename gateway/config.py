"""Gateway configuration: a YAML file, overridden by `SMALLFIRST_*` environment variables.

Built once at start-up and passed down; request code never reads the environment.
Precedence (highest first): explicit CLI flags, environment, config file, defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.limits import RateLimitConfig

DEFAULT_SMALL_MODEL = "hosted_vllm/smollm2-135m-instruct"


class ConfigError(Exception):
    """The configuration file or environment is invalid."""


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content, or a ConfigError naming the file, the line and the fix."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}{where}: {problem} in the {what}; fix the YAML there") \
            from exc


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as `key: message; ...`, without pydantic's links and input echo."""
    return "; ".join(f"{'.'.join(str(p) for p in error['loc']) or 'top level'}: {error['msg']}"
                     for error in exc.errors())


class BackendConfig(BaseModel):
    """One model endpoint reached through litellm."""

    model: str = Field(description="litellm model string, e.g. 'openai/gpt-4o'")
    api_base: str | None = None
    api_key: SecretStr | None = None
    name: str | None = Field(
        default=None,
        description="Public name clients may request directly; defaults to the model string "
        "without its provider prefix.",
    )

    @property
    def public_name(self) -> str:
        return self.name or self.model.split("/", 1)[-1]


class RetryConfig(BaseModel):
    """Retries of one backend call on 429 and 5xx (exponential backoff with full jitter)."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    backoff_base_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=4.0, ge=0)
    max_retry_after_s: float = Field(
        default=10.0, ge=0, description="An upstream Retry-After longer than this is not waited."
    )


class PriceConfig(BaseModel):
    """USD per million tokens, for cost and savings metrics."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class Settings(BaseSettings):
    # An empty variable counts as unset: `SMALLFIRST_X=` must not blank out the file's value.
    model_config = SettingsConfigDict(
        env_prefix="SMALLFIRST_", extra="forbid", env_ignore_empty=True
    )

    small_model: str = DEFAULT_SMALL_MODEL
    small_api_base: str = "http://127.0.0.1:8100/v1"
    small_api_key: SecretStr | None = None
    small_name: str | None = None
    small_client: Literal["direct", "litellm"] = Field(
        default="direct",
        description="'direct' speaks the OpenAI protocol to the small model over pooled HTTP "
        "(vLLM); 'litellm' goes through litellm like the frontier (any provider, slower).",
    )
    frontier_model: str | None = None
    frontier_api_base: str | None = None
    frontier_api_key: SecretStr | None = None
    frontier_name: str | None = None
    frontier_fallbacks: list[BackendConfig] = Field(
        default_factory=list, description="Tried in order after the frontier model fails."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for the exact and semantic cache; unset: an in-process exact cache.",
    )
    redis_timeout_s: float = Field(
        default=0.25, gt=0, description="Socket timeout of every Redis call; past it the call "
        "has failed (cache: a miss; rate limits and shadow budgets: counted in this process).")
    cache_semantic: bool = Field(
        default=True, description="With Redis, also run the semantic cache (needs FT.*)."
    )
    cache_prefix: str = Field(default="smallfirst", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    cache_memory_entries: int = Field(
        default=10_000, ge=1, description="Bound of the in-process cache (no Redis)."
    )
    policies: Path = Path("policies")
    default_policy: str = "auto"
    api_keys_file: Path | None = None
    auth: Literal["on", "off"] = "on"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(
        default=1, ge=1, le=256, description="Processes accepting on the one port, sharing "
        "nothing but Redis. 1: in Kubernetes add pods instead; on a VM, about one per core.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_in_flight: int = Field(default=256, ge=1, description="Beyond this, 429 with Retry-After.")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Slow clients (slowloris): how long a request's headers, its body, and each piece of the
    # answer (a client that stops reading) may take before the connection is cut.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=30.0, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    keep_alive_s: float = Field(
        default=75.0, gt=0, description="How long an idle client connection stays open for "
        "its next request: longer than clients' and load balancers' own idle timeouts (5 to "
        "60 s), so the gateway never closes a connection a client is about to reuse.")
    shutdown_grace_s: float = Field(
        default=30.0, gt=0, description="On SIGTERM, how long requests and streams in flight "
        "may take to finish (new connections are refused meanwhile); then they are cut.")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    watch_policies: bool = True
    metrics: bool = Field(default=True, description="Serve Prometheus text on /metrics.")
    prices: dict[str, PriceConfig] = Field(
        default_factory=dict,
        description="By public model name; frontier models default to litellm's price list, "
        "the small model to free.",
    )
    embedding_threads: int = Field(
        default=1, ge=1, le=64, description="Intra-op threads of the prompt embedder.")
    decision_log: Path | None = Field(
        default=None, description="JSON-lines file for sampled routing decisions (learning).")
    decision_stream: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._:-]{1,128}$",
        description="Redis Stream key for the same rows (needs redis_url), shared by replicas; "
        "`smallfirst router train --from-log redis://HOST:PORT/DB?stream=KEY` reads it.")
    decision_stream_maxlen: int = Field(
        default=100_000, ge=100, description="The stream keeps about this many newest rows.")
    rate_limits: RateLimitConfig = Field(
        default_factory=RateLimitConfig,
        description="Requests and tokens per minute and concurrent streams, per tenant and per "
        "key (defaults; the keys file overrides per tenant); shared in Redis when configured.")
    shutdown_drain_s: float = Field(
        default=0.0, ge=0, description="On SIGTERM, answer /readyz 503 and keep serving this "
        "long (load balancers route away), then stop accepting and finish what is in flight.")
    budget_window: int = Field(default=2048, ge=16, description="Samples per budget quantile.")
    log_level: str = "info"

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_words(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.lower() in {"0", "false", "no", "disabled"}:
            return "off"
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file arrives as init kwargs; the environment overrides it.
        return env_settings, init_settings

    @property
    def small(self) -> BackendConfig:
        return BackendConfig(
            model=self.small_model,
            api_base=self.small_api_base,
            api_key=self.small_api_key,
            name=self.small_name,
        )

    @property
    def frontiers(self) -> list[BackendConfig]:
        """The frontier model first, then its fallbacks, in the order they are tried."""
        first = []
        if self.frontier_model:
            first.append(
                BackendConfig(
                    model=self.frontier_model,
                    api_base=self.frontier_api_base,
                    api_key=self.frontier_api_key,
                    name=self.frontier_name,
                )
            )
        return first + list(self.frontier_fallbacks)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file, the environment, then explicit overrides."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = read_yaml(config_file, "config file") or {}
        if not isinstance(file_values, dict):
            raise ConfigError(f"{config_file}: expected a mapping at the top level")
        base = Path(config_file).parent
        for key in ("policies", "api_keys_file", "decision_log"):
            if isinstance(file_values.get(key), str):
                file_values[key] = str((base / file_values[key]).resolve())
    try:
        settings = Settings(**file_values)
    except ValidationError as exc:
        source = config_file or "the environment"
        raise ConfigError(f"{source}: {validation_message(exc)} (README: Configuration lists "
                          "the keys)") from exc
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    explicit = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=explicit) if explicit else settings
