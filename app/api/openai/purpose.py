"""The ``purpose`` field of a ``POST /v1/files`` upload, read as the body streams past."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable

from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.errors import ApiError


class PurposeSniffer:
    """Feeds the upload's body to a second multipart parser that keeps the ``purpose`` field as the chunks
    pass by; a purpose other than ``fine-tune`` stops the upload as soon as it is read."""

    def __init__(self, content_type: str) -> None:
        self.purpose: str | None = None
        self._name, self._value, self._hfield, self._hvalue = b"", b"", b"", b""
        self._broken = False
        _, options = parse_options_header(content_type)
        self._parser = MultipartParser(options.get(b"boundary", b"-"), {  # type: ignore[arg-type]
            "on_part_begin": self._begin, "on_header_field": self._hf, "on_header_value": self._hv,
            "on_header_end": self._he, "on_part_data": self._data, "on_part_end": self._end})

    def _begin(self) -> None:
        self._name, self._value = b"", b""

    def _hf(self, data: bytes, start: int, end: int) -> None:
        self._hfield += data[start:end]

    def _hv(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _he(self) -> None:
        if self._hfield.lower() == b"content-disposition":
            self._name = parse_options_header(self._hvalue)[1].get(b"name", b"")
        self._hfield, self._hvalue = b"", b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == b"purpose" and len(self._value) < 100:
            self._value += data[start:end]

    def _end(self) -> None:
        if self._name == b"purpose":
            self.purpose = self._value.decode("utf-8", "replace").strip()
            if self.purpose != "fine-tune":
                raise ApiError(400, "invalid_purpose", f"purpose {self.purpose!r} is not offered; use 'fine-tune'",
                               "purpose")

    async def sniff(self, chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            try:
                if not self._broken:
                    self._parser.write(chunk)
            except ApiError:
                raise
            except Exception:  # a malformed body is the upload parser's to report
                self._broken = True
            yield chunk
