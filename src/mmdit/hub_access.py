"""Hugging Face Hub access for a first run: one clear error when a licence-gated model (Gemma 2) has not
been granted, and transformers' / huggingface_hub's progress bars on one rank only.

Gated models need two things once per user: accepting the licence on the model's page while logged in,
and a token on the machine (``hf auth login``, or ``HF_TOKEN`` in the job's environment). The encoders
call :func:`gated_model_error` where a load fails; the trainer calls :func:`quiet_progress_bars` once per
process, so a 32-rank job prints one set of "Loading weights" bars, not 32.
"""

from __future__ import annotations

LOGIN_COMMAND = "hf auth login"


class GatedModelError(PermissionError):
    """A model whose licence must be accepted (and a token given) before it downloads."""


def is_gated_error(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is huggingface_hub's GatedRepoError (transformers
    re-raises it as an OSError saying "gated repo")."""
    from huggingface_hub.errors import GatedRepoError

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GatedRepoError) or "gated repo" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def access_instructions(name: str) -> str:
    """What a user runs / clicks to be granted a gated model (the README's line, here for one model)."""
    return (f"accept its licence at https://huggingface.co/{name} (logged in), then run `{LOGIN_COMMAND}` on this "
            "machine with a token of that account (or set HF_TOKEN for the job)")


def gated_model_error(name: str, err: BaseException, what: str = "model") -> GatedModelError | None:
    """The error to raise for a failed load of ``name`` when access to it was refused, else None.

    For the encoders (``mmdit.encoders.text.load_hf_config``)::

        gated = gated_model_error(name, err, what)
        if gated is not None:
            raise gated from err
    """
    if not is_gated_error(err):
        return None
    return GatedModelError(f"{what} {name!r} is gated by its licence and this machine has no access to it: "
                           f"{access_instructions(name)}")


def explain_hub_error(name: str, err: BaseException) -> str:
    """One line for any failed Hub download of ``name``: gated, not found, or offline."""
    gated = gated_model_error(name, err)
    if gated is not None:
        return str(gated)
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if constants.is_offline_mode() else ""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"{name!r} is neither a local folder nor a Hub model this machine can download{offline}: "
            f"{type(err).__name__}: {first}. Give a local folder, or check the id and your network")


def quiet_progress_bars(show: bool) -> None:
    """Progress bars (transformers' "Loading weights", huggingface_hub's downloads) only where ``show``."""
    if show:
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
