"""Errors whose message is meant for the user (the job's ``error`` or a /generate 4xx).

The API answers one with the status its code has in ``app.api.errors.USER_ERROR_STATUS`` (422 unless listed).
"""


class UserFacingError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field  # the request field at fault, when the API raises it before queueing
