"""The image fetcher against real loopback servers: the SSRF guard, redirects, limits, caching."""

from __future__ import annotations

import ipaddress
import os
import time

import pytest

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.inputs.fetch import ImageFetcher, ResponseCache
from llava_serve.inputs.netguard import is_public, parse_ip_literal
from tests.support.imageserver import ImageServer
from tests.support.media import encode, random_image

PNG = encode(random_image(0, (16, 16)))


@pytest.fixture(scope="module")
def target():
    """The server an attacker would like us to reach: every refusal must leave it untouched."""
    with ImageServer("127.0.0.1") as server:
        server.add("/secret", PNG)
        yield server


@pytest.fixture(scope="module")
def images_host():
    """An image host the tests allowlist explicitly (127.0.0.2/32), with hostile routes."""
    with ImageServer("127.0.0.2") as server:
        yield server


def fetcher(resolver=None, **limits) -> ImageFetcher:
    config = ImageConfig(**limits)
    return ImageFetcher(config) if resolver is None else ImageFetcher(config, resolver)


def fake_dns(answers: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int):
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise OSError(f"no such host {host}")
        return [ipaddress.ip_address(a) for a in answers[host]]

    return resolve


async def refused(f: ImageFetcher, url: str, code: str = "image_url_forbidden") -> ImageError:
    with pytest.raises(ImageError) as info:
        await f.fetch(url, "messages[0].content[0].image_url")
    assert info.value.code == code, info.value.message
    assert info.value.status_code == 400
    return info.value


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "0.0.0.0",
        "2130706433",  # decimal
        "0x7f000001",  # hex
        "0177.0.0.1",  # octal
        "127.1",  # short form
        "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
        "[::]",
    ],
)
async def test_default_policy_refuses_loopback_spellings_without_connecting(target, host):
    before = target.connections
    error = await refused(fetcher(), f"http://{host}:{target.port}/secret")
    assert "private, loopback" in error.message and error.param.endswith("image_url")
    assert target.connections == before


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.png",
        "http://172.16.5.4/x.png",
        "http://192.168.1.1/x.png",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://100.64.0.1/x.png",  # CGNAT
        "http://224.0.0.1/x.png",  # multicast
        "http://240.0.0.1/x.png",  # reserved
        "http://[fe80::1]/x.png",  # link-local
        "http://[fc00::1]/x.png",  # unique local
        "http://[ff02::1]/x.png",  # multicast
        "http://[2002:7f00:1::]/x.png",  # 6to4 wrapping 127.0.0.1
        "http://[64:ff9b::a00:1]/x.png",  # NAT64 wrapping 10.0.0.1
        "https://[::ffff:a9fe:a9fe]/x.png",  # mapped 169.254.169.254
    ],
)
async def test_default_policy_refuses_private_ranges_at_once(url):
    start = time.monotonic()
    await refused(fetcher(), url)
    assert time.monotonic() - start < 1.0  # refused, not a connect timeout


@pytest.mark.parametrize(
    "address",
    [
        "192.0.0.192",  # IETF protocol assignments; ipaddress on 3.11.7 calls it global
        "192.0.0.9",  # inside 192.0.0.0/24 though IANA marks it reachable (PCP anycast)
        "fec0::1",  # deprecated site-local; ipaddress on 3.11.7 calls it global
        "198.18.0.1",  # benchmarking
        "192.88.99.1",  # 6to4 relay anycast
        "100::1",  # discard-only
        "2001:db8::1",  # documentation
        "3fff::1",  # documentation (RFC 9637)
        "5f00::1",  # SRv6 SIDs, outside 2000::/3
        "2001:20::1",  # ORCHIDv2
        "::2",  # IPv4-compatible, deprecated
        "255.255.255.255",
    ],
)
def test_special_purpose_addresses_are_refused_whatever_the_interpreter_says(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("port", [22, 25, 6379, 8080])
async def test_a_public_host_on_a_port_outside_the_allowed_ones_is_refused_before_connecting(port):
    error = await refused(fetcher(fake_dns({"img.example": ["8.8.8.8"]})), f"http://img.example:{port}/x.png")
    assert f"port {port} is not allowed" in error.message


async def test_listed_ports_and_listed_hosts_pass_the_port_rule(images_host, target):
    images_host.add("/port.png", PNG)
    f = fetcher(allow_hosts=["127.0.0.2"], allowed_ports=[443])
    assert await f.fetch(f"{images_host.base_url}/port.png") == PNG  # the operator's own host, any port
    # A port the operator lists is allowed on a public host: the guard lets it through to connect.
    public = fetcher(fake_dns({"img.example": ["8.8.8.8"]}), allowed_ports=[80, 443, 8443])
    request = await public._pinned_request("http://img.example:8443/x.png", None)
    assert request.url.port == 8443


def test_public_addresses_pass_the_guard():
    for address in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "192.0.3.1", "2a00::1"]:
        assert is_public(ipaddress.ip_address(address)), address
    assert parse_ip_literal("0x08080808") == ipaddress.ip_address("8.8.8.8")
    assert parse_ip_literal("images.example.com") is None


async def test_a_public_looking_name_resolving_to_loopback_is_refused_without_connecting(target):
    before = target.connections
    dns = {"cdn.example.com": ["127.0.0.1"], "mixed.example.com": ["93.184.216.34", "127.0.0.1"]}
    f = fetcher(fake_dns(dns))
    await refused(f, f"http://cdn.example.com:{target.port}/secret")
    await refused(f, f"http://mixed.example.com:{target.port}/secret")  # one bad answer is enough
    assert target.connections == before


async def test_fetch_connects_to_the_address_it_checked(target):
    # `img.test` exists only in our resolver: success means httpx never resolved it again.
    calls: list[str] = []
    f = fetcher(fake_dns({"img.test": ["127.0.0.1"]}, calls), allow_hosts=["img.test"])
    assert await f.fetch(f"http://img.test:{target.port}/secret") == PNG
    assert calls == ["img.test"]
    path, headers = target.requests[-1]
    assert path == "/secret" and headers["Host"] == f"img.test:{target.port}"


async def test_allowlisted_cidr_is_fetched_and_others_still_refused(images_host, target):
    images_host.add("/ok.png", PNG)
    f = fetcher(allow_hosts=["127.0.0.2/32"])
    assert await f.fetch(f"{images_host.base_url}/ok.png") == PNG
    await refused(f, f"{target.base_url}/secret")


async def test_redirects_are_followed_by_hand_and_every_hop_is_checked(images_host, target):
    base = images_host.base_url
    images_host.add("/final.png", PNG)
    images_host.redirect("/r3", "/final.png")
    images_host.redirect("/r2", f"{base}/r3", 301)
    images_host.redirect("/r1", f"{base}/r2", 307)
    images_host.redirect("/r0", f"{base}/r1")
    images_host.redirect("/to-private", f"{target.base_url}/secret")
    images_host.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
    images_host.redirect("/to-file", "file:///etc/passwd")
    f = fetcher(allow_hosts=["127.0.0.2"], max_redirects=3)
    assert await f.fetch(f"{base}/r1") == PNG  # three hops
    error = await refused(f, f"{base}/r0", "image_fetch_failed")
    assert "more than 3" in error.message
    before = target.connections
    await refused(f, f"{base}/to-private")
    await refused(f, f"{base}/to-metadata")
    await refused(f, f"{base}/to-file", "invalid_image_url")
    assert target.connections == before


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "/etc/passwd"]
)
async def test_other_schemes_and_paths_are_refused(url):
    await refused(fetcher(), url, "invalid_image_url")


async def test_size_limit_holds_while_streaming_whatever_the_server_declares(images_host):
    images_host.endless("/endless")
    images_host.endless("/lies", declared=100)  # says 100 bytes, sends for ever
    images_host.add("/declared-huge", b"x" * 10, headers={"Content-Length": str(10**9)})
    images_host.endless("/declared-honest", declared=5000)
    f = fetcher(allow_hosts=["127.0.0.2"], max_bytes=4096)
    for path in ["/endless", "/declared-honest"]:
        error = await refused(f, images_host.base_url + path, "image_too_large")
        assert "4096" in error.message
    assert len(await f.fetch(images_host.base_url + "/lies")) == 100  # framing stops at the declared length


async def test_a_slow_drip_cannot_outlast_the_total_timeout(images_host):
    images_host.drip("/drip", PNG, interval_s=0.2)  # always within the read timeout
    f = fetcher(allow_hosts=["127.0.0.2"], total_timeout_s=1.0, read_timeout_s=5.0)
    start = time.monotonic()
    error = await refused(f, images_host.base_url + "/drip", "image_fetch_timeout")
    assert time.monotonic() - start < 2.0 and "1.0s" in error.message


async def test_http_errors_and_unresolvable_hosts_are_clean_400s(images_host):
    images_host.add("/gone", b"nope", "text/plain", status=404)
    f = fetcher(fake_dns({}), allow_hosts=["127.0.0.2"])
    assert "HTTP 404" in (await refused(f, images_host.base_url + "/gone", "image_fetch_failed")).message
    await refused(f, "http://nowhere.example.com/x.png", "image_fetch_failed")


async def test_cacheable_responses_are_reused_and_others_refetched(images_host):
    images_host.add("/cacheable.png", PNG, headers={"Cache-Control": "public, max-age=60"})
    images_host.add("/no-store.png", PNG, headers={"Cache-Control": "no-store, max-age=60"})
    images_host.add("/private.png", PNG, headers={"Cache-Control": "private, max-age=60"})
    f = fetcher(allow_hosts=["127.0.0.2"])
    for path, fetches in [("/cacheable.png", 1), ("/no-store.png", 3), ("/private.png", 3)]:
        for _ in range(3):
            assert await f.fetch(images_host.base_url + path) == PNG
        assert sum(p == path for p, _ in images_host.requests) == fetches, path


def test_response_cache_honours_ttl_and_byte_bound():
    cache = ResponseCache(max_bytes=10, max_ttl_s=0.05)
    cache.put("a", b"12345", "max-age=3600")  # capped at max_ttl_s
    cache.put("b", b"12345", "max-age=3600")
    cache.put("c", b"12345", "max-age=3600")  # evicts a
    assert cache.get("a") is None and cache.get("b") == b"12345" and cache.bytes == 10
    time.sleep(0.06)
    assert cache.get("b") is None and cache.get("c") is None


async def test_local_files_only_under_the_allowed_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    os.symlink(tmp_path / "outside.png", root / "link.png")
    await refused(fetcher(), "ok.png", "invalid_image_url")  # off by default
    f = fetcher(allowed_local_root=str(root))
    assert await f.fetch("ok.png") == PNG
    for escape in ["../outside.png", "link.png", str(tmp_path / "outside.png"), "/etc/passwd"]:
        error = await refused(f, escape, "invalid_image")
        assert "outside the allowed local root" in error.message, escape


@pytest.fixture(scope="module")
def tls_host(tmp_path_factory):
    """An https image host on 127.0.0.2 with certificates from a throwaway CA for a.test and
    b.test (chosen by SNI; any other name gets a.test's), and the CA file that trusts them."""
    import ssl

    import trustme

    ca = trustme.CA()
    contexts = {}
    for name in ("a.test", "b.test"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        contexts[name] = context
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with ImageServer("127.0.0.2", tls=contexts) as server:
        server.add("/ok.png", PNG)
        server.ca_file = str(ca_file)
        yield server


def tls_fetcher(server) -> ImageFetcher:
    names = {name: ["127.0.0.2"] for name in ("a.test", "b.test", "c.test")}
    return fetcher(fake_dns(names), allow_hosts=["127.0.0.2/32"], tls_ca_bundle=server.ca_file)


async def test_https_with_a_good_certificate_is_fetched(tls_host):
    assert await tls_fetcher(tls_host).fetch(f"https://a.test:{tls_host.port}/ok.png") == PNG


async def test_https_with_a_certificate_for_another_name_is_refused(tls_host):
    error = await refused(
        tls_fetcher(tls_host), f"https://c.test:{tls_host.port}/ok.png", "image_fetch_failed"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in error.message or "certificate" in error.message.lower()


async def test_two_names_on_one_address_each_get_their_own_verified_connection(tls_host):
    f = tls_fetcher(tls_host)
    before, names_before = tls_host.connections, len(tls_host.server_names)
    for name in ("a.test", "b.test", "a.test", "b.test"):
        assert await f.fetch(f"https://{name}:{tls_host.port}/ok.png") == PNG
    # One handshake per name, each verified for that name; then each name reuses its own.
    assert tls_host.server_names[names_before:] == ["a.test", "b.test"]
    assert tls_host.connections - before == 2


async def test_every_vetted_address_is_tried_in_turn(images_host):
    images_host.add("/multi.png", PNG)
    # Nothing listens on 127.0.0.3 at that port: the connect is refused and the next is tried.
    f = fetcher(fake_dns({"multi.test": ["127.0.0.3", "127.0.0.2"]}), allow_hosts=["127.0.0.0/8"])
    assert await f.fetch(f"http://multi.test:{images_host.port}/multi.png") == PNG


async def test_inline_images_are_decoded_off_the_event_loop():
    """A large base64 payload: the loop keeps ticking while it is decoded."""
    import asyncio
    import base64

    payload = base64.b64encode(os.urandom(15 * 1024 * 1024)).decode()
    start = time.perf_counter()
    base64.b64decode(payload, validate=True)
    decode_s = time.perf_counter() - start
    gaps: list[float] = []

    async def tick():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - t)

    f, uri = fetcher(max_bytes=16 * 1024 * 1024), f"data:image/png;base64,{payload}"
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    assert len(await f.fetch(uri)) == 15 * 1024 * 1024
    ticker.cancel()
    assert max(gaps) < decode_s / 2, (max(gaps), decode_s)
