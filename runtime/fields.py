"""The field checks every interface shares: InvalidRequest, and one checker per kind of value.

`runtime/validate.py`, the features (conditioning/, lora/, prompts/, tasks/) and the HTTP edge all raise
InvalidRequest(field, message) through these, so a bad value reads the same wherever it is checked; each interface
phrases `field` its own way (`--steps` on the CLI, `steps` in JSON).
"""

from __future__ import annotations

import math
import secrets

from PIL import Image

from sdrt.runtime.errors import UserError

MAX_SEED = 2 ** 64 - 1
MAX_GUIDANCE = 100.0


class InvalidRequest(UserError, ValueError):
    """A request field with a bad value: `field` names it (dotted for nested groups), `message` says why."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def integer(field: str, value, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequest(field, f"must be an integer, not {value!r}")
    if lo is not None and value < lo:
        raise InvalidRequest(field, f"must be at least {lo} (got {value}){what}")
    if hi is not None and value > hi:
        raise InvalidRequest(field, f"must be at most {hi} (got {value}){what}")
    return value


def number(field: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(field, f"must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number (got {value})")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidRequest(field, f"must be {'above' if lo_open else 'at least'} {lo:g} (got {value:g})")
    if hi is not None and value > hi:
        raise InvalidRequest(field, f"must be at most {hi:g} (got {value:g})")
    return value


def texts(field: str, value, allow_empty_list: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)  # one prompt, never its characters
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value and not allow_empty_list:
            raise InvalidRequest(field, "must hold at least one prompt")
        return tuple(value)
    raise InvalidRequest(field, f"must be a string or a list of strings, not {type(value).__name__}"
                                + (" holding non-strings" if isinstance(value, (list, tuple)) else ""))


def image(field: str, value, mode: str) -> Image.Image | None:
    if value is None:
        return None
    if not isinstance(value, Image.Image):
        raise InvalidRequest(field, f"must be an image (PIL in Python, base64 in JSON), not {type(value).__name__}")
    if value.width < 8 or value.height < 8:
        raise InvalidRequest(field, f"is {value.width}x{value.height}; it must be at least 8x8 pixels")
    try:
        return value.convert(mode)
    except (ValueError, OSError) as e:
        raise InvalidRequest(field, f"has mode {value.mode!r}, which cannot be converted to {mode} ({e})") from None


def seeds(value, count: int) -> tuple[int, ...]:
    seed = integer("seed", value)
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED - count + 2)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be in 0 … 2**64 − 1 = {MAX_SEED}, or -1 for a random seed (got {seed})")
    if seed + count - 1 > MAX_SEED:
        raise InvalidRequest("seed", f"image i uses seed + i; with {count} images the seed must be at most "
                                     f"{MAX_SEED - count + 1} (got {seed})")
    return tuple(seed + i for i in range(count))
