"""The error family users see. The CLI prints any InlaidError as one line and exits 1."""


class InlaidError(Exception):
    """A known failure caused by input or environment, reported without a traceback."""


class ConfigError(InlaidError):
    """Invalid option values (bits, group size, aggregation, ...)."""


class ModelLoadError(InlaidError):
    """The base model cannot be found, read or is not a supported architecture."""


class AdapterError(InlaidError):
    """A LoRA adapter is unreadable, unsafe (pickled) or does not fit the base model."""


class DataError(InlaidError):
    """Calibration data is missing, unreadable, empty or too short."""


class CheckpointError(InlaidError):
    """A directory is not an inlaid checkpoint, or was made with incompatible settings."""


class RequestError(ConfigError):
    """A request the engine rejects (bad sampling parameters, empty or too long prompt, duplicate
    id): the server answers it with a 400, never a 500, naming ``param`` (the request field at
    fault, as the OpenAI API spells it) where there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
