"""The hub's pub/sub connection over TLS (rediss://) against a real redis-server that the
test starts with a throwaway CA: the URL's ssl_* options must reach the handshake, an
untrusted certificate must be refused, and ssl_cert_reqs=none must turn the check off."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from redis.asyncio import Redis

from notifyd.realtime import pubsub
from scripts.localservers import find_redis_server, free_port
from tests.helpers import wait_for
from tests.test_hub_pubsub import Inbox, subscribed


@dataclass(frozen=True)
class TlsRedis:
    """A TLS-only redis-server on 127.0.0.1 and the CA that signed its certificate."""

    port: int
    ca: Path

    def url(self, **query: str) -> str:
        """A rediss:// URL to database 0 with `query` as redis-py's ssl_* URL options."""
        suffix = f"?{urlencode(query)}" if query else ""
        return f"rediss://127.0.0.1:{self.port}/0{suffix}"


def tls_unsupported(redis_server: Path) -> str | None:
    """Why this redis-server cannot serve TLS, or None when it can.

    A build without TLS rejects `tls-port` as an unknown directive; one with TLS accepts it
    and then stops because no certificate is configured. Either way it exits at once."""
    probe = subprocess.run(
        [str(redis_server), "--port", "0", "--tls-port", str(free_port()), "--save", ""],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = probe.stdout + probe.stderr
    if "tls-cert-file" in output:
        return None
    return f"{redis_server} was built without TLS: {output.strip()[-300:]}"


def openssl(openssl_bin: str, *args: str, cwd: Path) -> None:
    """Runs the openssl CLI; its stderr is in the failure, so a broken step says why."""
    done = subprocess.run(
        [openssl_bin, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed: {done.stderr}"


def make_certificates(openssl_bin: str, directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost.

    EC keys are cheap to generate (the machine is shared); the extensions are those a strict
    verifier wants: a critical CA:TRUE on the CA, SANs and serverAuth on the leaf."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "server.ext"
    extensions.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        openssl_bin,
        "req",
        "-x509",
        *ec,
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_cert),
        "-days",
        "2",
        "-subj",
        "/CN=notifyd test CA",
        "-addext",
        "basicConstraints = critical, CA:TRUE",
        "-addext",
        "keyUsage = critical, keyCertSign, cRLSign",
        cwd=directory,
    )
    openssl(
        openssl_bin,
        "req",
        "-new",
        *ec,
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
        cwd=directory,
    )
    openssl(
        openssl_bin,
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(extensions),
        "-out",
        str(cert),
        cwd=directory,
    )
    return ca_cert, cert, key


def answers_ping_over_tls(port: int, ca: Path) -> bool:
    """A verified handshake and +PONG: the server is up and serving the expected certificate."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:  # refused while starting; ssl.SSLError is an OSError too
        return False


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """One TLS redis-server for the module: starting one, and its certificates, costs CPU
    that the shared machine needs elsewhere."""
    redis_server = find_redis_server()
    reason = tls_unsupported(redis_server)
    if reason is not None:
        pytest.skip(reason)
    openssl_bin = shutil.which("openssl")
    if openssl_bin is None:
        pytest.skip("the openssl CLI is not installed: no way to make a test certificate")
    directory = tmp_path_factory.mktemp("redis-tls")
    ca, cert, key = make_certificates(openssl_bin, directory)
    port = free_port()
    log = directory / "redis.log"
    server = subprocess.Popen(
        [
            str(redis_server),
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(log),
        ],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not answers_ping_over_tls(port, ca):
            log_text = log.read_text(errors="replace") if log.exists() else "(no log)"
            assert server.poll() is None, f"redis-server exited: {server.returncode}\n{log_text}"
            assert time.monotonic() < deadline, f"TLS redis-server not ready in 15s\n{log_text}"
            time.sleep(0.05)
        yield TlsRedis(port, ca)
    finally:
        server.terminate()
        server.wait(10)


async def received_over_tls(url: str, publisher_url: str, channel: str, text: str) -> bool:
    """Subscribes through `url` (checking the connection is TLS), publishes `text` through
    a redis-py client at `publisher_url`; whether exactly that message arrived."""
    publisher = Redis.from_url(publisher_url)
    inbox = Inbox()
    try:
        async with subscribed(url, inbox, channel) as subscription:
            assert subscription._transport is not None
            assert subscription._transport.get_extra_info("ssl_object") is not None
            await publisher.publish(channel, text)
            await wait_for(lambda: inbox.messages, timeout=5)
    finally:
        await publisher.aclose()
    return inbox.messages == [(channel.encode(), text.encode())]


async def test_a_rediss_url_with_the_ca_subscribes_and_receives_messages(
    tls_redis: TlsRedis,
) -> None:
    """The ssl_ca_certs option of the URL reaches the handshake, which verifies the server's
    certificate (hostname included: 127.0.0.1 is in its SANs) and then carries pub/sub. The
    same URL may carry the command pool's options too (max_connections): they are not the
    handshake's, and must not break it."""
    url = tls_redis.url(ssl_ca_certs=str(tls_redis.ca), max_connections="8")
    assert await received_over_tls(url, url, "hubtest:tls", "over TLS")


async def test_without_the_ca_the_certificate_is_refused(tls_redis: TlsRedis) -> None:
    """Certificates are checked by default: a server whose CA we were not given is refused
    at the handshake, promptly, rather than trusted or waited on."""
    inbox = Inbox()
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await asyncio.wait_for(
            pubsub.connect(tls_redis.url(), inbox.on_message, inbox.on_read_end), timeout=10
        )


async def test_ssl_cert_reqs_none_connects_without_the_ca(tls_redis: TlsRedis) -> None:
    """ssl_cert_reqs=none, redis-py's way to skip verification, is honoured too: same TLS,
    no CA, and messages still arrive."""
    url = tls_redis.url(ssl_cert_reqs="none")
    publisher_url = tls_redis.url(ssl_ca_certs=str(tls_redis.ca))
    assert await received_over_tls(url, publisher_url, "hubtest:tls-unverified", "unverified")
