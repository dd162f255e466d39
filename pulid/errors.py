"""Typed errors the UI can show as they are, instead of a traceback.

Each error's text (``str(error)``, also ``error.user_message``) is what a person uploading a photo
can act on; ``error.detail`` holds the technical reason for the logs.
"""

from __future__ import annotations

from flux.errors import UserError


class PuLIDError(UserError):
    """Base class for errors caused by the user's input rather than by a bug."""

    default_message = "The request could not be processed."

    def __init__(self, message: str | None = None, *, detail: str | None = None) -> None:
        self.user_message = message or self.default_message
        self.detail = detail  # for logs; ``str(error)`` is the user message alone
        super().__init__(self.user_message)

    def __repr__(self) -> str:
        extra = "" if self.detail is None else f", detail={self.detail!r}"
        return f"{type(self).__name__}({self.user_message!r}{extra})"


class NoFaceError(PuLIDError, ValueError):
    """No detector found a face in the ID image, after every retry."""

    default_message = "No face found in the ID image. Upload a clear, front-facing photo of one person."


class InvalidImageError(PuLIDError, ValueError):
    """The ID image is missing, empty, of an unsupported type or too small to hold a face."""

    default_message = "The ID image could not be read. Upload a JPEG or PNG photo."
