"""The domain errors of the store, the runtime and retrieval, and the base of every error taer raises.
The serving layer's own (queue full, engine not ready) live with the engine contract in
``server/engine_api.py``.

Each message names the bad thing and says what to do. The CLI prints ``str(error)`` on one line and
exits non-zero; the HTTP layer maps these to the OpenAI error shape.
"""

from __future__ import annotations


class TaerError(Exception):
    """Base of every error taer raises on purpose (never a bug)."""


# Checkpoints and stores ---------------------------------------------------------------------------


class CheckpointError(TaerError):
    """The input checkpoint directory cannot be sharded (missing, pickle-only, not MoE, ...)."""


class UnsupportedFamilyError(CheckpointError):
    """The checkpoint's ``model_type`` is not a family taer knows how to split into experts."""


class StoreError(TaerError):
    """A store directory is missing, incomplete or from an unknown format version."""


class StoreExistsError(StoreError):
    """The output directory already holds something and ``--force`` was not given."""


class CorruptExpertError(StoreError):
    """An expert's bytes do not match the checksum the manifest recorded."""

    def __init__(self, path: str, layer: int, expert: int, detail: str = "checksum mismatch") -> None:
        self.path, self.layer, self.expert, self.detail = path, layer, expert, detail
        super().__init__(
            f"corrupt expert (layer {layer}, expert {expert}) in {path}: {detail}; "
            "re-run `taer shard` on the original checkpoint to rebuild the store"
        )

    def __reduce__(self):  # pickled whole, so that it crosses processes (a cluster's replicas)
        return type(self), (self.path, self.layer, self.expert, self.detail)


# Runtime -------------------------------------------------------------------------------------------


class BudgetError(TaerError):
    """A budget (slots, keep fraction, byte cap) that cannot work for this model."""


class SelectionError(TaerError):
    """A selection of experts that does not fit the model or the slots."""


# Tasks, patterns and retrieval ---------------------------------------------------------------------


class TasksFileError(TaerError):
    """A tasks file (YAML) or a calibration prompts file that cannot be used."""


class PatternError(TaerError):
    """Patterns that are missing, malformed or from another model."""


class UnknownTaskError(PatternError):
    """A task name that has no pattern."""


class RetrievalIndexError(TaerError):
    """A retrieval index that is empty, malformed or built with another encoder."""


class EncoderError(TaerError):
    """The sentence encoder cannot be loaded."""


class DiscoveryError(TaerError):
    """A request log that `taer discover` cannot read, or prompts it cannot cluster."""


# Serving ---------------------------------------------------------------------------------------------


class RequestError(TaerError):
    """A client request that is well-formed JSON but asks for something impossible.

    ``param`` names the offending field, as the OpenAI error shape has it.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        self.param, self.status = param, status
        super().__init__(message)

    def __reduce__(self):  # pickled whole, so that it crosses processes (a cluster's replicas)
        return type(self), (str(self), self.param, self.status)
