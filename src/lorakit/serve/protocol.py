"""Request bodies of the OpenAI-compatible API, and errors in OpenAI's shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body; the code says which kind of 404 (a model, a route, an endpoint off)."""
        kinds = {
            401: ("authentication_error", "invalid_api_key"),
            404: ("invalid_request_error", "model_not_found" if self.param == "model" else None),
            413: ("invalid_request_error", "request_too_large"),
        }
        kind, code = kinds.get(self.status, ("invalid_request_error", None))
        if self.status >= 500:
            kind = "server_error"
        error = {"message": self.message, "type": kind, "param": self.param}
        return {"error": {**error, "code": self.code or code}}


# Every body is validated strictly: JSON types as OpenAI documents them ("yes" is no boolean,
# "10" no integer), no NaN or infinity, numbers in range.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_INT64 = 2**63


class StreamOptions(BaseModel):
    """`stream_options`: whether the last streamed chunk carries the usage."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _STRICT

    model: str = Field(min_length=1, description="base model name or adapter name")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=-1, description="keep the k best tokens; -1/0/None: all")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(
        None, ge=-_INT64, lt=_INT64, description="seed of this request's sampler (64-bit)"
    )
    n: int = Field(1, description="completions per request; only 1 is supported")
    stream: bool = Field(False, description="send server-sent events")
    stream_options: StreamOptions | None = Field(None, description="include_usage")
    user: str | None = Field(None, description="accepted, not used")

    @field_validator("n")
    @classmethod
    def _only_one(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of at most 256 characters")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        return tuple(self.stop or ())

    def top_k_value(self) -> int:
        """top_k with 'off' as 0."""
        return max(self.top_k or 0, 0)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] = Field(description="one prompt: text or token ids")
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate at most")
    echo: Literal[False] = Field(False, description="not supported")


class TextPart(BaseModel):
    """One text part of a message's content list."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")

    def token_budget(self) -> int | None:
        """max_completion_tokens, else max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter."""

    model_config = _STRICT
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=512)


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter."""

    model_config = _STRICT
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str | None = None


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body, turning the first problem into a 400 that names the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        shown = _shown(first.get("input")) if first["type"] != "missing" else "nothing"
        message = f"{field}: {first['msg']} (given: {shown})"
        raise ApiError(400, message, param=field) from None


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # too deep, or an integer of over 4300 digits
        return "a deeply nested value"
    return text if len(text) <= 80 else text[:77] + "..."
