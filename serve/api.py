"""The OpenAI chat-completions surface: request bodies (pydantic), what is taken from them (one
image, the last user message's text, generation options), response and error shapes.

What a request means here. InstructBLIP answers one instruction about one image, with no
conversation memory, so: the prompt is the text of the **last** message, which must be the
user's; the image is the one ``image_url`` part anywhere in ``messages`` (a follow-up question
can leave the image in an earlier turn); earlier turns' text, system and developer messages
are not shown to the model. Exactly one image per request.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from ib_edge.runtime.errors import InputError
from ib_edge.runtime.preprocess import load_image

from .engine import GenParams, check_params


# --- request bodies -------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None  # accepted, without effect: the bundle's preprocessing fixes the size


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


# Options that would change the answer and that this server cannot honour: refused, not ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "stop", "logprobs", "top_logprobs",
               "logit_bias", "audio", "prediction", "web_search_options", "frequency_penalty",
               "presence_penalty", "response_format", "modalities")
NEUTRAL = {"logprobs": (False,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
           "response_format": ({"type": "text"},), "modalities": (["text"],)}


class RequestError(InputError):
    """A request the API refuses: HTTP ``status``, OpenAI error ``type``/``code``/``param``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status, self.type, self.code, self.param = status, type, code, param


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- what a request asks --------------------------------------------------------------------
def gen_params(req: ChatRequest, default_max_tokens: int) -> GenParams:
    """Generation options. Omitted temperature is greedy (as ib-run; OpenAI's own default, 1,
    samples): an omitted option gives the same answer as ib-run with its defaults."""
    if req.n not in (None, 1):
        raise RequestError(f"n={req.n}: this server returns one choice per request", param="n")
    extra = req.model_extra or {}
    for name in UNSUPPORTED:
        if name in extra and extra[name] is not None and extra[name] not in NEUTRAL.get(name, ()):
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise RequestError("max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
    n = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    p = GenParams(max_new_tokens=default_max_tokens if n is None else n,
                  temperature=0.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)
    try:
        return check_params(p)
    except InputError as e:
        raise RequestError(str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None


def prompt_and_image(messages: list[Message], frames: int | None = None) -> tuple[str, str | list[str]]:
    """(prompt, image URL): the last message's text (a user message) and the one image part.
    ``frames`` (a video bundle's frame count): the image parts are its frames, in order, and
    there must be that many (one part may instead be an animated GIF, sampled as ib-run does);
    the URLs come back as a list."""
    urls = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type == "image_url":
                    if part.image_url is None:
                        raise RequestError("an image_url part without image_url.url", param=f"messages.{i}.content.{j}")
                    urls.append(part.image_url.url)
                elif part.type != "text":
                    raise RequestError(f"content part type {part.type!r} is not supported (text, image_url)",
                                       param=f"messages.{i}.content.{j}")
    if frames is not None and len(urls) not in (1, frames):
        raise RequestError(f"{len(urls)} images in the request: this video model takes {frames} frames, as "
                           f"{frames} image_url parts in order (or one animated GIF)", param="messages")
    if not urls:
        raise RequestError("no image in the request: InstructBLIP answers about one image",
                           param="messages", hint="add a content part {\"type\": \"image_url\", \"image_url\": "
                                                  "{\"url\": \"data:image/png;base64,...\"}}")
    if len(urls) > 1 and frames is None:
        raise RequestError(f"{len(urls)} images in the request: InstructBLIP takes exactly one", param="messages",
                           hint="send one request per image")
    last = messages[-1]
    if last.role != "user":
        raise RequestError(f"the last message is from {last.role!r}; it must be the user's question",
                           param="messages")
    if isinstance(last.content, str):
        text = last.content
    else:
        text = "\n".join(p.text or "" for p in (last.content or []) if p.type == "text")
    if not text.strip():
        raise RequestError("the last user message has no text: the prompt is empty", param="messages",
                           hint="ask a question, e.g. \"Describe this image.\"")
    return text, (urls if frames is not None else urls[0])


def load_request_image(url: str, allow_files: Path | None, max_bytes: int):
    """An image_url -> an RGB PIL image, with ib-run's checks. data: URLs always; file:// only
    under ``allow_files``; nothing is fetched over the network."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(data_url_bytes(url))
    if scheme in ("http", "https"):
        raise RequestError("image URLs over http(s) are not fetched by this server",
                           param="image_url", code="url_not_allowed",
                           hint="send the image inline as a data:image/...;base64,... URL")
    if scheme == "file":
        return load_allowed_file(url, allow_files, max_bytes)
    raise RequestError(f"image URL scheme {scheme or url[:16]!r} is not supported (data:, file://)",
                       param="image_url")


def data_url_bytes(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:"):
        raise RequestError("malformed data URL (expected data:image/...;base64,...)", param="image_url")
    meta = head[5:].split(";")
    if not meta[0].lower().startswith("image/"):
        raise RequestError(f"data URL media type {meta[0] or '(none)'!r} is not an image", param="image_url")
    if "base64" not in (m.lower() for m in meta[1:]):
        raise RequestError("data URL is not base64-encoded (expected ;base64,)", param="image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image data is not valid base64", param="image_url") from None


def decode_image(data: bytes):
    """Image bytes -> RGB PIL image, exactly as ``ib-run`` and the Python API decode encoded
    bytes (``preprocess.load_image``: size checked before decoding, EXIF orientation applied as
    transformers does for a file)."""
    if not data:
        raise RequestError("image data is empty", param="image_url")
    try:
        return load_image(bytes(data))
    except InputError as e:
        raise RequestError(e.line(), param="image_url") from None


def load_allowed_file(url: str, allow_files: Path | None, max_bytes: int):
    if allow_files is None:
        raise RequestError("file:// image URLs are off on this server", param="image_url", code="file_not_allowed",
                           hint="send the image inline as a data: URL, or start ib-serve with --allow-files DIR")
    u = urlparse(url)
    if u.netloc not in ("", "localhost"):
        raise RequestError(f"file:// URL names host {u.netloc!r}; only local files are read", param="image_url",
                           code="file_not_allowed")
    raw = unquote(u.path)
    root = allow_files.resolve()
    try:
        path = Path(raw).resolve(strict=True)  # symlinks followed: the real file must be inside root
    except (OSError, RuntimeError):
        path = None
    if path is None or not path.is_relative_to(root):
        # the same answer for "absent" and "outside", so the API cannot probe the file system
        raise RequestError(f"{raw} is not a file under --allow-files", param="image_url", code="file_not_allowed")
    if not path.is_file():
        raise RequestError(f"{raw} is not a file under --allow-files", param="image_url", code="file_not_allowed")
    if path.stat().st_size > max_bytes:
        raise RequestError(f"{raw} is larger than the request size limit ({max_bytes >> 20} MiB)",
                           param="image_url")
    try:
        return load_image(path)
    except InputError as e:
        raise RequestError(e.line(), param="image_url") from None


# --- responses --------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def completion_body(cid: str, model: str, created: int, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "ib-edge"}


def now() -> int:
    return int(time.time())
