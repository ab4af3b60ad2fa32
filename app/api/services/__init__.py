"""The logic both HTTP surfaces (app/api/routes and app/api/openai) call: plain functions over the stores and
the settings, no FastAPI request or response objects; they raise ``ApiError`` or ``UserFacingError``."""
