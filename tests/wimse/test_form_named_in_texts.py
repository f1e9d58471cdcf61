"""The demo and the ASGI middleware's docstring name the HTTP-signature form
custos sends (audit of issue 7: both said httpsig-06 while -08 is sent)."""

from __future__ import annotations

import inspect
from pathlib import Path

import custos.demo
import custos.integrations.asgi
from custos.wimse.httpsig import sign_request


def _sent_form() -> str:
    # A response is signed in its request's form, so this is the responses' form too.
    default = inspect.signature(sign_request).parameters["form"].default
    return str(default).removeprefix("draft-")  # "08"


def test_the_demo_names_no_stale_form() -> None:
    # The issue-9 demo shows WPTs through the agent, not HTTP signatures; it must not
    # name a form custos no longer sends.
    text = Path(inspect.getfile(custos.demo)).read_text()
    assert "httpsig-06" not in text


def test_the_asgi_docstring_names_the_form_it_signs_responses_in() -> None:
    doc = custos.integrations.asgi.__doc__ or ""
    assert f"Signed responses (httpsig-{_sent_form()}" in doc
    assert "httpsig-06" not in doc
