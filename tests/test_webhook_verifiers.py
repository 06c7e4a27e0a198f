"""The README's webhook verifiers in JavaScript and Go accept what notifyd sends (issue 29).

README.md shows how a tenant verifies a webhook with the Standard Webhooks libraries of three
languages; `tests/test_webhooks.py` verifies every request with the Python one. Here the
README's own JavaScript and Go blocks, taken from README.md as they are, are built into two
small programs with the published libraries (npm `standardwebhooks`, the Go module of the
standard-webhooks repository, both from their registries) and given a request a daemon
really sent: each must accept it, and refuse it with one byte of the body changed.

Skipped, with the reason, on a machine without Node.js or Go.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.test_webhooks import FAST, Received, create, receiver, send_in_app

README = Path(__file__).resolve().parent.parent / "README.md"
NPM_PACKAGE = "standardwebhooks@1.1.1"
GO_MODULE = "github.com/standard-webhooks/standard-webhooks/libraries"
GO_VERSION = "v1.3.0"
SETUP_TIMEOUT_S = 300.0  # a first download of the library and, for Go, a build
RUN_TIMEOUT_S = 60.0


def readme_block(language: str) -> str:
    """The README's code block of `language` in its Webhooks section."""
    section = README.read_text().split("\n## Webhooks\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert found is not None, f"README.md's Webhooks section has no {language} block"
    return found.group(1)


def run(argv: list[str], cwd: Path, timeout: float = SETUP_TIMEOUT_S) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"


def verify(argv: list[str], cwd: Path, request: Received, body: bytes) -> tuple[int, str]:
    """Runs a verifier on `body` with the request's headers and the endpoint's secret."""
    (cwd / "body").write_bytes(body)
    (cwd / "headers.json").write_text(json.dumps(request.headers))
    done = subprocess.run(
        [*argv, request.verified_by[0], "body", "headers.json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    return done.returncode, done.stdout + done.stderr


JS_PROGRAM = """\
import { readFileSync } from "node:fs";
const [secret, bodyPath, headersPath] = process.argv.slice(2);
const rawBody = readFileSync(bodyPath, "utf8");
const headers = JSON.parse(readFileSync(headersPath, "utf8"));
// the README's block, as it is:
%s
console.log("verified", event.type);
"""

GO_PROGRAM = """\
package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"

	standardwebhooks "%s/go"
)

func main() {
	secret := os.Args[1]
	rawBody, _ := os.ReadFile(os.Args[2])
	names, _ := os.ReadFile(os.Args[3])
	var headers map[string]string
	if err := json.Unmarshal(names, &headers); err != nil {
		panic(err)
	}
	request := &http.Request{Header: http.Header{}}
	for name, value := range headers {
		request.Header.Set(name, value)
	}
	// the README's block, as it is:
%s
	if err != nil {
		fmt.Println("refused:", err)
		os.Exit(1)
	}
	fmt.Println("verified")
}
"""


@pytest.fixture
def node_verifier(tmp_path: Path) -> tuple[list[str], Path]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js (node, npm) is not installed")
    folder = tmp_path / "js"
    folder.mkdir()
    (folder / "package.json").write_text('{"type": "module", "private": true}\n')
    run(["npm", "install", "--no-audit", "--no-fund", "--silent", NPM_PACKAGE], folder)
    (folder / "verify.mjs").write_text(JS_PROGRAM % readme_block("js"))
    return ["node", "verify.mjs"], folder


@pytest.fixture
def go_verifier(tmp_path: Path) -> tuple[list[str], Path]:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed")
    folder = tmp_path / "go"
    folder.mkdir()
    block = "\n".join("\t" + line for line in readme_block("go").splitlines())
    (folder / "main.go").write_text(GO_PROGRAM % (GO_MODULE, block))
    run(["go", "mod", "init", "verifier"], folder)
    run(["go", "get", f"{GO_MODULE}@{GO_VERSION}"], folder)
    run(["go", "build", "-o", "verify", "."], folder)
    return ["./verify"], folder


@pytest.fixture
async def sent(daemon_factory: DaemonFactory) -> AsyncIterator[Received]:
    """A `notification.sent` webhook a daemon delivered, as its endpoint received it."""
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api, receiver() as hook:
        created = await create(api, hook.url, ["notification.sent"])
        hook.secrets.append(created["secret"])
        await send_in_app(api)
        await wait_for(lambda: hook.of_type("notification.sent"))
        [request] = hook.of_type("notification.sent")
        yield request


def altered(body: bytes) -> bytes:
    """The body with one byte changed: a forged or damaged request."""
    return body.replace(b'"notification.sent"', b'"notification.sEnt"', 1)


async def test_the_readmes_javascript_verifier_accepts_a_real_webhook_and_refuses_an_altered_one(
    node_verifier: tuple[list[str], Path], sent: Received
) -> None:
    argv, folder = node_verifier
    code, output = verify(argv, folder, sent, sent.raw)
    assert (code, output.split()[:2]) == (0, ["verified", "notification.sent"]), output
    code, output = verify(argv, folder, sent, altered(sent.raw))
    assert code != 0 and "verified" not in output, output


async def test_the_readmes_go_verifier_accepts_a_real_webhook_and_refuses_an_altered_one(
    go_verifier: tuple[list[str], Path], sent: Received
) -> None:
    argv, folder = go_verifier
    code, output = verify(argv, folder, sent, sent.raw)
    assert (code, output.strip()) == (0, "verified"), output
    code, output = verify(argv, folder, sent, altered(sent.raw))
    assert code == 1 and output.startswith("refused"), output
