"""TLS: STARTTLS in the driver and the embedded server, nbds:// URIs (issue 9).

Certificates come from trustme.  In-process tests run the embedded server over memory
streams (TLS works over any trio stream); interop tests use nbdkit --tls=require,
qemu-nbd with x509 credentials, and nbdinfo against `blockdrv serve --tls-*`.
"""

from __future__ import annotations

import errno
import ssl
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from support.cli import blockdrv
from support.inprocess import serving
from support.peers import EmbeddedServer, Nbdkit, QemuNbd, sparse_image
from support.streams import WrappedStream

from blockdrv import InvalidArgumentError, OptionError, ProtocolError, open_nbd
from blockdrv.io.tls import TLSError, TLSMode, TLSSettings, client_context, server_context
from blockdrv.protocol.constants import OPTION_REPLY_MAGIC, Option, OptionReply
from blockdrv.protocol.options import encode_option
from blockdrv.server import Export, MemoryBackend
from blockdrv.util.units import MiB

URI = "nbds+unix:///?socket=/in-process"
PLAIN_URI = "nbd+unix:///?socket=/in-process"


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, in the
    directory layout nbdkit, qemu and libnbd expect."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(exist_ok=True)
        self.ca = trustme.CA()
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        client = self.ca.issue_cert("blockdrv-client")
        self.ca.cert_pem.write_to_path(str(directory / "ca-cert.pem"))
        server.cert_chain_pems[0].write_to_path(str(directory / "server-cert.pem"))
        server.private_key_pem.write_to_path(str(directory / "server-key.pem"))
        client.cert_chain_pems[0].write_to_path(str(directory / "client-cert.pem"))
        client.private_key_pem.write_to_path(str(directory / "client-key.pem"))
        for key in ("server-key.pem", "client-key.pem"):
            (directory / key).chmod(0o600)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def server_settings(self, mode: TLSMode = TLSMode.REQUIRE, *,
                        client_ca: bool = False) -> TLSSettings:
        context = server_context(cert=self.path("server-cert.pem"),
                                 key=self.path("server-key.pem"),
                                 ca=self.path("ca-cert.pem") if client_ca else None)
        return TLSSettings(mode, context)


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path / "pki")


@asynccontextmanager
async def tls_server(settings: TLSSettings | None, size: int = MiB, **options):
    export = Export("", MemoryBackend(size))
    async with serving(export, **({"tls": settings} if settings else {}), **options) as srv:
        yield srv, export


async def test_driver_and_embedded_server_talk_through_tls(certs):
    with trio.fail_after(30):
        async with tls_server(certs.server_settings()) as (srv, export):
            async with open_nbd(URI, stream_factory=srv.connect,
                                tls_ca=certs.path("ca-cert.pem")) as dev:
                assert dev.info.tls and dev.info.structured and dev.info.extended
                assert "base:allocation" in dev.info.contexts  # negotiated again in TLS
                await dev.pwrite(b"secret" * 1000, 4096)
                assert await dev.pread(6000, 4096) == b"secret" * 1000
                assert (await dev.block_status(MiB, 0))[0].length > 0
            assert srv.server.requests_served > 0


async def test_a_client_certificate_is_checked_when_the_server_has_a_ca(certs):
    with trio.fail_after(30):
        async with tls_server(certs.server_settings(client_ca=True)) as (srv, _):
            with pytest.raises(TLSError, match="client certificate"):
                async with open_nbd(URI, stream_factory=srv.connect,
                                    tls_ca=certs.path("ca-cert.pem")):
                    pass
            async with open_nbd(URI, stream_factory=srv.connect,
                                tls_ca=certs.path("ca-cert.pem"),
                                tls_cert=certs.path("client-cert.pem"),
                                tls_key=certs.path("client-key.pem")) as dev:
                assert await dev.pread(16, 0) == bytes(16)


async def test_allow_uses_tls_when_offered_and_plaintext_when_not(certs):
    with trio.fail_after(30):
        async with tls_server(certs.server_settings(TLSMode.ALLOW)) as (srv, _):
            async with open_nbd(PLAIN_URI, stream_factory=srv.connect, tls="allow",
                                tls_ca=certs.path("ca-cert.pem")) as dev:
                assert dev.info.tls
            async with open_nbd(PLAIN_URI, stream_factory=srv.connect) as dev:
                assert not dev.info.tls  # the server allows plaintext too
        async with tls_server(None) as (srv, _):
            async with open_nbd(PLAIN_URI, stream_factory=srv.connect, tls="allow",
                                tls_ca=certs.path("ca-cert.pem")) as dev:
                assert not dev.info.tls
                await dev.pwrite(b"x", 0)


async def test_a_server_that_requires_tls_refuses_a_plaintext_client(certs):
    with trio.fail_after(30):
        async with tls_server(certs.server_settings()) as (srv, _):
            with pytest.raises(OptionError, match="requires TLS"):
                async with open_nbd(PLAIN_URI, stream_factory=srv.connect):
                    pass
            assert srv.server.requests_served == 0


class PlaintextAfterAck(WrappedStream):
    """Appends bytes to the server's STARTTLS acknowledgement (a man in the middle)."""

    ACK = (OPTION_REPLY_MAGIC.to_bytes(8, "big") + int(Option.STARTTLS).to_bytes(4, "big")
           + int(OptionReply.ACK).to_bytes(4, "big") + bytes(4))

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.seen = b""
        self.injected = False

    async def receive_some(self, max_bytes=None) -> bytes:  # type: ignore[no-untyped-def]
        data = await self.inner.receive_some(max_bytes)
        self.seen += data
        if not self.injected and self.ACK in self.seen:
            self.injected = True
            data += b"\x00\x00\x00\x00evil plaintext"
        return data


@pytest.mark.parametrize("refusal", ["wrong-ca", "hostname", "no-tls-server",
                                     "plaintext-after-ack", "downgrade"])
async def test_refusals_are_clear_errors_and_no_io_happens(certs, tmp_path, refusal):
    other = Certs(tmp_path / "other")
    settings = None if refusal == "no-tls-server" else certs.server_settings()
    options = {"tls_ca": certs.path("ca-cert.pem")}
    expected: tuple[type[Exception], str] = (TLSError, "")
    with trio.fail_after(30):
        async with tls_server(settings) as (srv, export):
            connect = srv.connect
            if refusal == "wrong-ca":
                options["tls_ca"] = other.path("ca-cert.pem")
                expected = (TLSError, "certificate verify failed")
            elif refusal == "hostname":
                options["tls_hostname"] = "db.example.com"
                expected = (TLSError, "db.example.com")
            elif refusal == "no-tls-server":
                expected = (OptionError, "refused STARTTLS")
            elif refusal == "plaintext-after-ack":
                connect = srv.wrapped_connect(PlaintextAfterAck)
                expected = (ProtocolError, "plaintext")
            else:
                options["tls"] = "off"
                expected = (InvalidArgumentError, "downgrade")
            with pytest.raises(expected[0], match=expected[1]) as failure:
                async with open_nbd(URI, stream_factory=connect, **options) as dev:
                    await dev.pwrite(b"should never be written", 0)
            # Each refusal has its own errno: a bad peer is EPROTO, a refused STARTTLS
            # the server's EPERM, a downgrade the caller's EINVAL.
            assert failure.value.errno == {"no-tls-server": errno.EPERM,
                                           "downgrade": errno.EINVAL}.get(refusal, errno.EPROTO)
            assert srv.server.requests_served == 0
            assert export.backend.allocated == 0


async def test_reconnect_redoes_tls(certs, autojump_clock):
    with trio.fail_after(60):
        async with tls_server(certs.server_settings()) as (srv, _):
            async with open_nbd(URI, stream_factory=srv.connect, reconnect_delay=30,
                                retry_initial=0.5, tls_ca=certs.path("ca-cert.pem")) as dev:
                await dev.pwrite(b"a" * 4096, 0)
                srv.kill()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(srv.restart_after, 2)  # a two (virtual) second outage
                    await dev.pwrite(b"b" * 4096, 4096)  # waits for the reconnect
                assert await dev.pread(8192, 0) == b"a" * 4096 + b"b" * 4096
                assert dev.statistics().reconnects == 1 and dev.info.tls


async def test_a_server_that_comes_back_without_tls_is_refused(certs, autojump_clock):
    with trio.fail_after(60):
        async with tls_server(certs.server_settings(TLSMode.ALLOW)) as (srv, _):
            async with open_nbd(PLAIN_URI, stream_factory=srv.connect, tls="allow",
                                reconnect_delay=30, retry_initial=0.5,
                                tls_ca=certs.path("ca-cert.pem")) as dev:
                assert dev.info.tls
                srv.kill()
                srv.restart(tls=TLSSettings())  # plaintext only now
                with pytest.raises(OSError, match="TLS"):
                    await dev.pread(512, 0)


async def test_the_server_never_acts_on_plaintext_sent_behind_starttls(certs):
    """CVE-2021-3716 (nbdkit): options injected after STARTTLS must not be obeyed."""
    with trio.fail_after(30):
        async with tls_server(certs.server_settings()) as (srv, _):
            stream = await srv.connect()
            starttls = encode_option(Option.STARTTLS)
            injected = encode_option(Option.STRUCTURED_REPLY)
            await stream.receive_some(18)  # greeting
            await stream.send_all(b"\0\0\0\3" + starttls + injected)  # one packet
            received = b""
            while chunk := await stream.receive_some(1024):
                received += chunk
            assert PlaintextAfterAck.ACK not in received  # no TLS, no ACK: hung up


def test_a_ca_given_is_the_only_one_trusted(certs):
    context = client_context(ca=certs.path("ca-cert.pem"))
    assert len(context.get_ca_certs()) == 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.raises(TLSError, match="cannot load the CA certificates"):
        client_context(ca=certs.path("server-key.pem"))


# --- real peers ------------------------------------------------------------------------


@pytest.mark.interop
async def test_driver_against_nbdkit_with_tls_require(certs, tmp_path):
    with Nbdkit(tmp_path, "--tls=require", f"--tls-certificates={certs.dir}",
                "memory", "16M") as peer, trio.fail_after(60):
        uri = peer.uri().replace("nbd+unix", "nbds+unix")
        async with open_nbd(uri, tls_ca=certs.path("ca-cert.pem"), reconnect_delay=30,
                            retry_initial=0.2) as dev:
            assert dev.info.tls
            await dev.pwrite(b"n" * 65536, 0)
            assert await dev.pread(65536, 0) == b"n" * 65536
        with pytest.raises(OptionError, match="requires TLS"):
            async with open_nbd(peer.uri()):
                pass
        # the URI form: tls-certificates names the directory (ca-cert.pem in it)
        async with open_nbd(f"{uri}&tls-certificates={certs.dir}") as dev:
            assert dev.info.tls


@pytest.mark.interop
async def test_reconnect_over_tls_to_a_restarted_nbdkit(certs, tmp_path):
    image = sparse_image(tmp_path / "disk.img", 16 * MiB)
    with Nbdkit(tmp_path, "--tls=require", f"--tls-certificates={certs.dir}", "file",
                str(image)) as peer, trio.fail_after(60):
        uri = peer.uri().replace("nbd+unix", "nbds+unix")
        async with open_nbd(uri, tls_ca=certs.path("ca-cert.pem"), reconnect_delay=30,
                            retry_initial=0.1, retry_max=0.2) as dev:
            blocks = {i: bytes([i]) * 65536 for i in range(64)}
            for i, data in blocks.items():
                await dev.pwrite(data, i * 65536)
                if i == 20:  # the server dies and comes back: the next writes wait for it
                    peer.restart()
            for i, data in blocks.items():
                assert await dev.pread(65536, i * 65536) == data
            assert dev.statistics().reconnects >= 1 and dev.info.tls


@pytest.mark.interop
async def test_driver_against_qemu_nbd_with_x509(certs, tmp_path):
    image = sparse_image(tmp_path / "disk.img", 16 * MiB)
    with QemuNbd(tmp_path, image, "--object",
                 f"tls-creds-x509,id=tls0,dir={certs.dir},endpoint=server",
                 "--tls-creds", "tls0") as peer, trio.fail_after(60):
        uri = peer.uri().replace("nbd+unix", "nbds+unix")
        # qemu verifies client certificates by default (verify-peer=on)
        with pytest.raises(TLSError, match="client certificate"):
            async with open_nbd(uri, tls_ca=certs.path("ca-cert.pem")):
                pass
        async with open_nbd(uri, tls_ca=certs.path("ca-cert.pem"),
                            tls_cert=certs.path("client-cert.pem"),
                            tls_key=certs.path("client-key.pem")) as dev:
            assert dev.info.tls
            await dev.pwrite(b"q" * 4096, 8192)
            assert await dev.pread(4096, 8192) == b"q" * 4096


@pytest.mark.interop
def test_nbdinfo_against_the_embedded_server_with_tls(certs, tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "8M", "--tls-cert",
                        certs.path("server-cert.pem"), "--tls-key",
                        certs.path("server-key.pem")) as peer:
        uri = peer.uri().replace("nbd+unix", "nbds+unix") + f"&tls-certificates={certs.dir}"
        out = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert '"TLS": true' in out.stdout
        plain = subprocess.run(["nbdinfo", peer.uri()], capture_output=True, text=True,
                               timeout=60)
        assert plain.returncode != 0  # FORCEDTLS: no plaintext client gets in
        ours = blockdrv("info", "--json", uri, check=False, timeout=60)
        assert ours.returncode == 0, ours.stderr
        assert '"TLS": true' in ours.stdout


def test_serve_upstream_speaks_tls_to_its_upstream(certs, tmp_path):
    """`blockdrv serve --upstream nbds+unix://...`: TLS to nbdkit, plaintext to the
    proxy's own (local) clients."""
    (tmp_path / "up").mkdir()
    with Nbdkit(tmp_path / "up", "--tls=require", f"--tls-certificates={certs.dir}",
                "memory", "16M") as upstream:
        uri = upstream.uri().replace("nbd+unix", "nbds+unix")
        with EmbeddedServer(tmp_path, "--upstream", uri, "--upstream-tls-ca",
                            certs.path("ca-cert.pem")) as proxy:
            for command in ("write -P 0x5a 0 64K", "read -P 0x5a 0 64K"):
                done = subprocess.run(["qemu-io", "-f", "raw", "-c", command,
                                       proxy.uri()], capture_output=True, text=True,
                                      timeout=60)
                assert done.returncode == 0, done.stderr
                assert "fail" not in done.stdout + done.stderr, done.stdout
