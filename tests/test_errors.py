"""One base for every error meant for the user (:class:`flux.errors.UserError`), and the front
doors' answer to one: its message, never a traceback."""

import ast
import importlib
from pathlib import Path

import pytest

from flux.errors import UserError
from tests.import_map import module_files

REPO = Path(__file__).resolve().parent.parent
NOT_ERRORS = {"flux.sampling.GenerationCancelled"}  # a request to stop, raised through the loop


def exception_classes() -> list[str]:
    """Every class of the packages defined on an exception base, by dotted name."""
    found = []
    for module, path in module_files(REPO).items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and base.id.endswith(("Error", "Exception", "Cancelled"))
                for base in node.bases
            ):
                found.append(f"{module}.{node.name}")
    return found


def test_every_error_of_the_packages_is_a_user_error():
    classes = exception_classes()
    assert len(classes) > 15  # the walk found them
    for name in classes:
        module, _, attribute = name.rpartition(".")
        error = getattr(importlib.import_module(module), attribute)
        assert issubclass(error, UserError) != (name in NOT_ERRORS), name


def test_a_lora_that_does_not_fit_is_the_visitors_message_not_a_failure(uploading_service, monkeypatch):
    """A LoRA error raised at generation (a file replaced after it was listed) reached the visitor
    as "the generation failed"; as a user error its own message goes back."""
    from flux.lora import LoRAError
    from pulid.request import GenerationRequest
    from pulid.serve.service import ServiceError

    service, _ = uploading_service

    def refuse(request, report, save):
        raise LoRAError("LoRA 'style' is for another model: its layers are not FLUX.1-dev's.")

    monkeypatch.setattr(service.runner, "generate", refuse)
    with pytest.raises(ServiceError, match="is for another model"):
        service.run(GenerationRequest.from_values(prompt="a portrait", width=256, height=256))
