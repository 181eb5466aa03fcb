"""The one ``flotilla serve`` of Qwen2.5-Coder-0.5B-Instruct that the tool-calling and real-client tests share.

``qwen_server`` (session scope, so the model loads once per test run however many modules use it):
``flotilla serve qwen2.5-coder-0.5b-instruct --max-model-len 1024 --served-model-name qwen
--enable-auto-tool-choice --tool-call-parser hermes``; skipped when the model's packages are not installed
(``./scripts/setup.sh`` installs them). ``qwen_client``: an ``openai.OpenAI`` client for it (no retries, so a
failure shows as itself). Registered for every test module by ``conftest.py``; the server is stopped (and
must exit 0) at the end of the session.
"""

from __future__ import annotations

import openai
import pytest

from flotilla.models.loader import get_alias
from test_server_helpers import ServerProcess

QWEN_ALIAS = "qwen2.5-coder-0.5b-instruct"
QWEN_MODEL = "qwen"  # --served-model-name


@pytest.fixture(scope="session")
def qwen_server():
    alias = get_alias(QWEN_ALIAS)
    if alias.locate() is None and alias.missing_parts():
        pytest.skip(f"{QWEN_ALIAS} is not installed (run ./scripts/setup.sh, or: {alias.install_command})")
    srv = ServerProcess(QWEN_ALIAS, "--max-model-len", "1024", "--served-model-name", QWEN_MODEL,
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", startup_timeout=300)
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="session")
def qwen_client(qwen_server):
    return openai.OpenAI(base_url=qwen_server.base_url, api_key="x", max_retries=0, timeout=300)
