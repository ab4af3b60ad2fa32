"""Errors whose message is meant for the user (the job's ``error`` or a /generate 4xx)."""


class UserFacingError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
