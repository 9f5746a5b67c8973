"""The RouterOS API emulator: wire format, queries, state, and the server as a client sees it."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routeros_api import base_api, exceptions
from routeros_api.query import HasValueQuery, IsEqualQuery, IsLessQuery, NandQuery, OrQuery

from doublenat.lab.routeros import (
    NO_ROUTE,
    FaultKind,
    NoSuchItemError,
    Profile,
    Query,
    QueryError,
    RouteCheck,
    RouterError,
    RouterOsEmulator,
    RouterState,
    UnknownParameterError,
)
from doublenat.lab.routeros.commands import Command, parse_duration
from doublenat.lab.routeros.query import Compare, Has, Lacks, StackOps, parse_term, project
from doublenat.lab.routeros.state import format_uptime
from doublenat.lab.routeros.wire import (
    ProtocolError,
    SentenceReader,
    decode_length,
    encode_length,
    encode_sentence,
)

from .conftest import PASSWORD, USER, Connect, RawClient

NAT = "/ip/firewall/nat"
Raw = Callable[..., RawClient]


def dstnat(port: int, **extra: str) -> dict[str, str]:
    rule = {
        "chain": "dstnat",
        "action": "dst-nat",
        "protocol": "tcp",
        "in-interface": "ether1",
        "dst-port": str(port),
        "to-addresses": "192.168.88.10",
        "to-ports": str(port),
        "comment": f"double-natpmp-tcp-{port}",
    }
    rule.update(extra)
    return rule


def kw(rule: dict[str, str]) -> dict[str, str]:
    return {k.replace("-", "_"): v for k, v in rule.items()}


# ======================================================================================
# wire.py
# ======================================================================================

GOLDEN_LENGTHS = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "8080"),
    (256, "8100"),
    (0x3FFF, "bfff"),
    (0x4000, "c04000"),
    (0x1FFFFF, "dfffff"),
    (0x200000, "e0200000"),
    (0xFFFFFFF, "efffffff"),
    (0x10000000, "f010000000"),
    (0xFFFFFFFF, "f0ffffffff"),
]


@pytest.mark.parametrize(("length", "hexbytes"), GOLDEN_LENGTHS)
def test_length_golden_bytes(length: int, hexbytes: str) -> None:
    encoded = encode_length(length)
    assert encoded.hex() == hexbytes
    assert decode_length(encoded) == (length, len(encoded))
    # The shipped client agrees on every form.
    assert base_api.encode_length(length) == encoded


@pytest.mark.parametrize("first", [0xF8, 0xF9, 0xFC, 0xFF, 0xF1, 0xF7])
def test_control_and_oversized_length_bytes_are_protocol_errors(first: int) -> None:
    with pytest.raises(ProtocolError):
        decode_length(bytes([first, 0, 0, 0, 0]))
    with pytest.raises(ProtocolError):
        SentenceReader().feed(encode_sentence([b"/login"]) + bytes([first]))


def test_incomplete_prefix_is_not_an_error() -> None:
    assert decode_length(b"") is None
    assert decode_length(b"\x81") is None
    assert decode_length(b"\xf0\x10\x00") is None
    assert decode_length(b"\x81\x00") == (256, 2)


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_length_round_trip_matches_routeros_api(length: int) -> None:
    encoded = encode_length(length)
    assert encoded == base_api.encode_length(length)
    assert decode_length(encoded + b"junk") == (length, len(encoded))


def test_reader_copes_with_one_byte_segments_and_pipelining() -> None:
    comment = "=comment=" + "x" * 247  # 256 bytes: the prefix is 81 00
    stream = (
        encode_sentence([b"/login", b"=name=admin", b"=password"])
        + b"\x00"  # an empty sentence, ignored
        + encode_sentence([b"/ip/firewall/nat/add", comment.encode(), b".tag=2"])
    )
    assert b"\x81\x00" + comment.encode() in stream
    expected = [
        [b"/login", b"=name=admin", b"=password"],
        [b"/ip/firewall/nat/add", comment.encode(), b".tag=2"],
    ]
    reader = SentenceReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == expected
    assert not reader.pending
    assert SentenceReader().feed(stream) == expected


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_reader_any_segmentation(sentences: list[list[bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode_sentence(s) for s in sentences)
    reader = SentenceReader()
    got: list[list[bytes]] = []
    pos = 0
    for cut in cuts:
        got += reader.feed(stream[pos : pos + cut])
        pos += cut
    got += reader.feed(stream[pos:])
    assert got == sentences


def test_reader_refuses_huge_words() -> None:
    with pytest.raises(ProtocolError):
        SentenceReader(limit=1000).feed(encode_length(5000))


# ======================================================================================
# query.py
# ======================================================================================


def test_query_word_forms() -> None:
    assert parse_term("?comment") == Has("comment")
    assert parse_term("?-comment") == Lacks("comment")
    assert parse_term("?chain=dstnat") == Compare("=", "chain", "dstnat")
    assert parse_term("?=comment=a=b") == Compare("=", "comment", "a=b")
    assert parse_term("?<bytes=10") == Compare("<", "bytes", "10")
    assert parse_term("?>comment=") == Compare(">", "comment", "")
    assert parse_term("?#|!") == StackOps("|!")
    with pytest.raises(QueryError):
        parse_term("?#x")
    with pytest.raises(QueryError):
        parse_term("?")


ROW = {".id": "*A", "chain": "dstnat", "bytes": "9", "disabled": "false", "comment": "hello"}


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([], True),
        (["?chain=dstnat"], True),
        (["?=chain=srcnat"], False),
        (["?comment"], True),
        (["?-comment"], False),
        (["?-log"], True),
        (["?disabled=no"], True),  # booleans compare as booleans
        (["?disabled=yes"], False),
        (["?<bytes=10"], True),  # numbers compare as numbers: "9" < "10"
        (["?>bytes=10"], False),
        (["?bytes=09"], True),
        (["?>comment="], True),  # "has a non-empty comment"
        (["?>log-prefix="], False),
        (["?<.id=*10"], True),  # ids compare by number, *A < *10
        (["?chain=srcnat", "?chain=dstnat", "?#|"], True),
        (["?chain=srcnat", "?chain=dstnat", "?#&"], False),
        (["?chain=srcnat", "?#!"], True),
        (["?chain=dstnat", "?chain=srcnat"], False),  # implicit AND
        # "1" copies the entry under the top: [F, T] -> [F, T, F]; end of word: whole stack
        (["?chain=srcnat", "?chain=dstnat", "?#1"], False),
        (["?chain=srcnat", "?chain=dstnat", "?#0"], True),  # whole stack becomes [T]
        (["?chain=srcnat", "?#0.!"], False),  # "0." pushes a copy, "." does nothing more
        (["?chain=srcnat", "?#.!&"], False),  # "." duplicates: F,F -> F,T -> F
        (["?#5"], True),  # indices past the bottom read the endless `true`
        (["?#!"], False),
    ],
)
def test_query_stack_machine(words: list[str], expected: bool) -> None:
    assert Query.parse(words).matches(ROW) is expected


VALUES = st.sampled_from(["a", "b", "c", None])


def _row(value: str | None) -> dict[str, str]:
    return {} if value is None else {"p": value}


@given(VALUES, st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]))
def test_or_equals_union(value: str | None, x: str, y: str) -> None:
    row = _row(value)
    either = Query.parse([f"?p={x}", f"?p={y}", "?#|"]).matches(row)
    assert either == (
        Query.parse([f"?p={x}"]).matches(row) or Query.parse([f"?p={y}"]).matches(row)
    )


@given(VALUES, st.sampled_from(["a", "b", "c"]), st.sampled_from(["?p", "?-p"]))
def test_negation_and_de_morgan(value: str | None, x: str, other: str) -> None:
    row = _row(value)
    a = Query.parse([f"?p={x}"]).matches(row)
    b = Query.parse([other]).matches(row)
    assert Query.parse([f"?p={x}", "?#!"]).matches(row) == (not a)
    nand = Query.parse([f"?p={x}", other, "?#&!"]).matches(row)
    assert nand == Query.parse([f"?p={x}", "?#!", other, "?#!", "?#|"]).matches(row)
    assert nand == (not (a and b))


def test_proplist_projection() -> None:
    assert project(ROW, ("comment", ".id", "absent")) == {"comment": "hello", ".id": "*A"}
    assert project(ROW, ("absent",)) == {}
    assert project(ROW, None) == ROW


# ======================================================================================
# state.py
# ======================================================================================


def test_table_defaults_ids_and_order() -> None:
    state = RouterState()
    first = state.nat.add(dstnat(1000))
    second = state.nat.add(dstnat(2000), disabled="yes")
    assert (first, second) == ("*1", "*2")
    row = state.nat.get("*2")
    assert row is not None
    assert row["disabled"] == "true"
    for name, value in {
        "log": "false",
        "log-prefix": "",
        "bytes": "0",
        "packets": "0",
        "invalid": "false",
        "dynamic": "false",
    }.items():
        assert row[name] == value
    assert "src-address" not in row
    third = state.nat.add(dstnat(3000), place_before="*2")
    assert state.nat.ids() == ["*1", "*3", "*2"]
    state.nat.remove(first)
    assert state.nat.add(dstnat(4000)) == "*4"  # ids never go back
    assert third in state.nat and first not in state.nat


def test_table_refusals() -> None:
    state = RouterState(setup="bare")
    state.add_interface("ether1")
    with pytest.raises(UnknownParameterError, match="unknown parameter frobnicate"):
        state.nat.add(dstnat(1), frobnicate="1")
    with pytest.raises(UnknownParameterError):
        state.nat.add(dstnat(1), bytes="5")  # read-only through the API
    with pytest.raises(RouterError, match="input does not match any value of in-interface"):
        state.nat.add(dstnat(1, **{"in-interface": "wg-proton"}))
    state.add_interface("wg-proton", "wg")
    state.nat.add(dstnat(1, **{"in-interface": "wg-proton"}))
    with pytest.raises(RouterError, match="input does not match any value of disabled"):
        state.nat.add(dstnat(2), disabled="maybe")
    with pytest.raises(RouterError, match="invalid value for argument dst-port"):
        state.nat.add(dstnat(2), dst_port="70000")
    with pytest.raises(RouterError, match="missing value"):
        state.nat.add(action="accept")
    with pytest.raises(NoSuchItemError):
        state.nat.set("*99", comment="x")
    with pytest.raises(RouterError, match="invalid internal item number"):
        state.nat.remove("bogus")
    # All or nothing: the existing rule survives a list with a missing id.
    with pytest.raises(NoSuchItemError):
        state.nat.remove("*1,*99")
    assert len(state.nat) == 1


def test_table_set_unset_and_seeding() -> None:
    state = RouterState()
    rule = state.nat.add(dstnat(1))
    state.nat.set(rule, comment="", log="yes", dst_port="2")
    row = state.nat.get(rule)
    assert row is not None
    assert "comment" not in row and row["log"] == "true" and row["dst-port"] == "2"
    state.nat.unset(rule, ["log", "dst-port"])
    row = state.nat.get(rule)
    assert row is not None
    assert row["log"] == "false" and "dst-port" not in row
    seeded = state.nat.add(dstnat(5), dynamic=True, bytes=1234, validate=False)
    assert state.nat.find(dynamic="true")[0][".id"] == seeded
    assert state.nat.find(bytes=1234, dst_port=5)[0][".id"] == seeded


def test_observers_see_api_and_admin_changes() -> None:
    state = RouterState()
    seen: list[tuple[str, str, str | None]] = []
    unsubscribe = state.nat.add_observer(lambda k, r: seen.append((k, r[".id"], r.get("to-ports"))))
    rule = state.nat.add(dstnat(1))
    state.nat.set(rule, to_ports="9")
    state.nat.remove(rule)

    def broken(kind: str, row: dict[str, str]) -> None:
        raise RuntimeError("observer bug")

    state.nat.add_observer(broken)
    state.nat.add(dstnat(2))  # the broken observer does not break the table
    unsubscribe()
    state.nat.clear()
    assert seen == [
        ("add", "*1", "1"),
        ("set", "*1", "9"),
        ("remove", "*1", "9"),
        ("add", "*2", "2"),
    ]
    assert len(state.nat.observer_errors) == 2  # the add, then the clear's remove
    assert len(state.nat) == 0


def test_legacy_route_api_on_the_routing_model() -> None:
    """The older `state.routes` calls still work, as routes in the model."""
    state = RouterState()
    assert state.routes.check("8.8.8.8") == RouteCheck("ok", "ether1", "192.0.2.1")
    state.routes.set("10.2.0.0/16", interface="wg-proton", nexthop="10.2.0.1")
    state.routes.set("10.2.0.1", interface="wg-proton", nexthop="10.2.0.1", status="ok")
    state.routes.set_no_route("10.9.0.0/16")
    assert state.routes.check("10.2.0.1").interface == "wg-proton"
    assert state.routes.check("10.2.3.4").nexthop == "10.2.0.1"
    assert state.routes.check("10.9.1.1") == NO_ROUTE
    # Setting a destination again replaces the route set before.
    state.routes.set("10.2.0.0/16", interface="ether1")
    assert state.routes.check("10.2.3.4").interface == "ether1"
    state.interfaces.add("wg-backup")
    assert state.interface_type("wg-backup") == "wg"
    state.routes.clear()
    assert state.routes.check("8.8.8.8") == NO_ROUTE


def test_small_parsers() -> None:
    assert format_uptime(0) == "0s"
    assert format_uptime(694861) == "1w1d1h1m1s"
    assert format_uptime(3600) == "1h"
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1m30s") == 90
    assert parse_duration("00:00:02") == 2
    with pytest.raises(ValueError):
        parse_duration("soon")
    command = Command.parse(["/x/print", "=once", "=a=b=c", "?q=1", ".tag=7", ".proplist=x"])
    assert command.attrs == {"once": "", "a": "b=c"}
    assert (command.queries, command.tag, command.menu, command.verb) == (
        ("?q=1",),
        "7",
        "/x",
        "print",
    )


def test_profiles() -> None:
    modern = Profile.named("7.18")
    assert modern.empty_sentence and not modern.challenge_login and modern.named_unknown_parameter
    assert not Profile.for_version("7.16").empty_sentence
    legacy = Profile.for_version("6.42.1")
    assert legacy.challenge_login and not legacy.plaintext_login
    assert (
        Profile.for_version("6.44").challenge_login and Profile.for_version("6.44").plaintext_login
    )
    assert not Profile.for_version("7.16", route_check=False).route_check


# ======================================================================================
# The server, through the real routeros-api client
# ======================================================================================


def test_login_ok_and_failed(emulator: RouterOsEmulator, connect: Connect) -> None:
    connect(emulator)
    with pytest.raises(exceptions.RouterOsApiCommunicationError) as failed:
        connect(emulator, password="wrong")
    assert failed.value.original_message == b"invalid user name or password (6)"
    assert "invalid user name or password" in str(failed.value)
    assert (emulator.counters.logins_ok, emulator.counters.logins_failed) == (1, 1)


def test_md5_login_fails_on_modern_profile_and_works_on_legacy(connect: Connect) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}) as modern:
        with pytest.raises(exceptions.RouterOsApiCommunicationError, match="invalid user name"):
            connect(modern, plaintext_login=False)
        # Two /login sentences went out: the bare one, then the MD5 response.
        assert len(modern.sent("/login")) == 2
    with RouterOsEmulator(users={USER: PASSWORD}, profile="6.42") as legacy:
        _, api = connect(legacy, plaintext_login=False)
        assert api.get_resource("/system/identity").get() == [{"name": "MikroTik"}]
        with pytest.raises(exceptions.RouterOsApiCommunicationError, match="cannot log in"):
            connect(legacy, password="wrong", plaintext_login=False)
        # A pre-6.43 router ignores the plaintext password and hands out a challenge,
        # which routeros-api answers with MD5: plaintext_login=True still works there.
        connect(legacy, plaintext_login=True)


def test_empty_password_is_sent_without_trailing_equals(connect: Connect) -> None:
    with RouterOsEmulator(users={"admin": ""}) as emu:
        connect(emu, "admin", "")
        assert emu.sent("/login")[0].words[2] == "=password"
        assert emu.counters.logins_ok == 1


def test_close_after_failed_login(raw: Raw) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}, close_after_failed_login=True) as emu:
        client = raw(emu, login=False)
        reply = client.call("/login", f"=name={USER}", "=password=nope", ".tag=1")
        assert reply == [
            ("!trap", "=message=invalid user name or password (6)", ".tag=1"),
            ("!done", ".tag=1"),
        ]
        assert client.closed_by_peer()


def test_commands_before_login(raw: Raw) -> None:
    # Recorded: a bare `!fatal` reason, then the router closes. That is the default.
    with RouterOsEmulator(users={USER: PASSWORD}) as emu:
        client = raw(emu, login=False)
        client.send("/ip/firewall/nat/print", ".tag=a")
        assert client.read() == ("!fatal", "not logged in")
        assert client.closed_by_peer()
    # The older guess stays available as an option.
    with RouterOsEmulator(users={USER: PASSWORD}, before_login="trap") as emu:
        client = raw(emu, login=False)
        assert client.call("/ip/firewall/nat/print", ".tag=a") == [
            ("!trap", "=message=not logged in", ".tag=a"),
            ("!done", ".tag=a"),
        ]
        client.login()
        assert client.call("/system/identity/print") == [("!re", "=name=MikroTik"), ("!done",)]


def test_add_print_set_remove(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    nat = api.get_resource(NAT)
    first = nat.add(**kw(dstnat(8080)))
    second = nat.add(**kw(dstnat(8081, protocol="udp")))
    assert (first.done_message, second.done_message) == ({"ret": "*1"}, {"ret": "*2"})
    rows = nat.get()
    assert [r["id"] for r in rows] == ["*1", "*2"]
    assert rows[0] == {
        "id": "*1",
        **dstnat(8080),
        "log": "false",
        "log-prefix": "",
        "bytes": "0",
        "packets": "0",
        "invalid": "false",
        "dynamic": "false",
        "disabled": "false",
    }
    assert [r["id"] for r in nat.get(protocol="udp", chain="dstnat")] == ["*2"]
    assert nat.set(id="*1", to_ports="9090", disabled="yes").done_message == {}
    assert nat.get(id="*1")[0]["to-ports"] == "9090"
    assert nat.get(disabled="true")[0]["id"] == "*1"
    nat.remove(id="*1")
    assert [r["id"] for r in nat.get()] == ["*2"]
    assert emulator.state.nat.ids() == ["*2"]


def test_numbers_and_comma_lists(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    nat = api.get_resource(NAT)
    for port in (1, 2, 3):
        nat.add(**kw(dstnat(port)))
    nat.call("disable", {"numbers": "*1,*2"})
    assert [r["disabled"] for r in nat.get()] == ["true", "true", "false"]
    nat.call("unset", {"numbers": "*3", "value-name": "comment"})
    assert "comment" not in nat.get(id="*3")[0]
    nat.call("remove", {"numbers": "*1,*3"})
    assert emulator.state.nat.ids() == ["*2"]


def test_print_queries_or_nand_has_and_less(emulator: RouterOsEmulator, connect: Connect) -> None:
    for port in (1000, 2000, 3000):
        emulator.state.nat.add(dstnat(port))
    emulator.state.nat.add(chain="srcnat", action="masquerade", out_interface="ether1")
    _, api = connect(emulator)
    nat = api.get_resource(NAT)

    def ports(rows: list[dict[str, str]]) -> list[str | None]:
        return [r.get("dst-port") for r in rows]

    either = OrQuery(IsEqualQuery("dst-port", "1000"), IsEqualQuery("dst-port", "3000"))
    assert ports(nat.call("print", {}, {}, additional_queries=(either,))) == ["1000", "3000"]
    neither = NandQuery(IsEqualQuery("chain", "dstnat"), IsEqualQuery("dst-port", "2000"))
    assert ports(nat.call("print", {}, {"chain": "dstnat"}, (neither,))) == ["1000", "3000"]
    assert ports(nat.call("print", {}, {}, (HasValueQuery("to-ports"),))) == [
        "1000",
        "2000",
        "3000",
    ]
    assert ports(nat.call("print", {}, {}, (IsLessQuery("dst-port", "2500"),))) == ["1000", "2000"]
    # The OR reached the router as three ordered query words.
    assert emulator.sent(f"{NAT}/print")[0].words[1:4] == (
        "?dst-port=1000",
        "?dst-port=3000",
        "?#|",
    )


def test_proplist_count_only_and_empty(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.state.nat.add(dstnat(1))
    emulator.state.nat.add(dstnat(2))
    _, api = connect(emulator)
    binary = api.get_binary_resource(NAT)
    rows = binary.call("print", {".proplist": b".id,dst-port"}, {"chain": b"dstnat"})
    assert list(rows) == [{"id": b"*1", "dst-port": b"1"}, {"id": b"*2", "dst-port": b"2"}]
    assert list(binary.call("print", {".proplist": b"src-address"})) == [{}, {}]  # bare !re
    assert binary.call("print", {"count-only": None}).done_message == {"ret": b"2"}
    counted = binary.call("print", {"count-only": b""}, {"dst-port": b"2"})
    assert counted.done_message == {"ret": b"1"}
    typed = api.get_resource(NAT).call("print", {"proplist": "comment"})
    assert list(typed) == [{"comment": "double-natpmp-tcp-1"}, {"comment": "double-natpmp-tcp-2"}]
    assert api.get_resource(NAT).get(comment="nothing") == []


def test_empty_sentence_by_profile(raw: Raw) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}) as emu:
        assert raw(emu).call(f"{NAT}/print", ".tag=5") == [
            ("!empty", ".tag=5"),
            ("!done", ".tag=5"),
        ]
    with RouterOsEmulator(users={USER: PASSWORD}, profile="7.16") as emu:
        assert raw(emu).call(f"{NAT}/print", ".tag=5") == [("!done", ".tag=5")]
        emu.profile = "7.19"  # switchable at run time
        assert raw(emu).call(f"{NAT}/print")[0] == ("!empty",)


def test_refusals_through_the_client(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    nat = api.get_resource(NAT)

    def error(call: Callable[[], object]) -> bytes:
        with pytest.raises(exceptions.RouterOsApiCommunicationError) as caught:
            call()
        return caught.value.original_message

    assert error(lambda: nat.remove(id="*7")) == b"no such item (4)"
    assert error(lambda: nat.set(id="*7", comment="x")) == b"no such item (4)"
    assert error(lambda: nat.add(**kw(dstnat(1)), colour="red")) == b"unknown parameter colour"
    assert (
        error(lambda: nat.add(**kw(dstnat(1, **{"in-interface": "ether9"}))))
        == b"input does not match any value of in-interface"
    )
    assert error(lambda: api.get_resource("/ip/adress").get()) == b"no such command prefix"
    assert error(lambda: api.get_resource(NAT).call("frob")) == b"no such command"
    # A trap leaves the connection usable.
    assert nat.add(**kw(dstnat(1))).done_message == {"ret": "*1"}
    emulator.profile = "6.49"
    assert error(lambda: nat.add(**kw(dstnat(1)), colour="red")) == b"unknown parameter"


def test_unknown_menu_gives_two_traps(emulator: RouterOsEmulator, raw: Raw) -> None:
    client = raw(emulator)
    assert client.call("/ip/adress/print", ".tag=3") == [
        ("!trap", "=category=0", "=message=no such command or directory (adress)", ".tag=3"),
        ("!trap", "=message=no such command prefix", ".tag=3"),
        ("!done", ".tag=3"),
    ]
    assert client.call(f"{NAT}/print", "=colour=red") == [
        ("!trap", "=message=unknown parameter colour"),
        ("!done",),
    ]


def test_raw_query_words_and_proplist(emulator: RouterOsEmulator, raw: Raw) -> None:
    emulator.state.nat.add(dstnat(1))
    emulator.state.nat.add(dstnat(2, comment=""))
    client = raw(emulator)
    no_comment = client.call(f"{NAT}/print", "?-comment", "=.proplist=.id,dst-port", ".tag=x")
    assert no_comment == [("!re", "=.id=*2", "=dst-port=2", ".tag=x"), ("!done", ".tag=x")]
    either = client.call(f"{NAT}/print", "?dst-port=1", "?dst-port=2", "?#|", "=count-only=")
    assert either == [("!done", "=ret=2")]
    assert client.call(f"{NAT}/print", "?#x") == [
        ("!trap", "=category=1", "=message=unknown query operation 'x'"),
        ("!done",),
    ]


def test_long_comment_round_trip(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    nat = api.get_resource(NAT)
    comment = "c" * 247
    nat.add(**kw(dstnat(1, comment=comment)))
    assert nat.get()[0]["comment"] == comment
    unicode_comment = "pörtforward ✓" * 40  # past 256 bytes, multi-byte characters
    nat.set(id="*1", comment=unicode_comment)
    assert nat.get()[0]["comment"] == unicode_comment


def test_route_check_once(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.state.routes.set("10.2.0.1", interface="wg-proton", nexthop="10.2.0.1")
    emulator.state.routes.set_no_route("10.66.0.0/16")
    _, api = connect(emulator)
    route = api.get_resource("/ip/route")
    assert route.call("check", {"dst-ip": "10.2.0.1", "once": None}) == [
        {"status": "ok", "interface": "wg-proton", "nexthop": "10.2.0.1"}
    ]
    binary = api.get_binary_resource("/ip/route")
    assert list(binary.call("check", {"dst-ip": b"1.1.1.1", "once": b""})) == [
        {"status": b"ok", "interface": b"ether1", "nexthop": b"192.0.2.1"}
    ]
    assert list(route.call("check", {"dst-ip": "10.66.1.1", "once": None})) == [
        {"status": "unreachable"}
    ]
    only_interface = route.call(
        "check", {"dst-ip": "10.2.0.1", "once": None, ".proplist": "interface"}
    )
    assert list(only_interface) == [{"interface": "wg-proton"}]
    assert emulator.sent("/ip/route/check")[0].words[1:3] in (
        ("=dst-ip=10.2.0.1", "=once"),
        ("=once", "=dst-ip=10.2.0.1"),
    )
    emulator.profile = Profile.for_version("7.16", route_check=False)
    with pytest.raises(exceptions.RouterOsApiCommunicationError, match="no such command"):
        route.call("check", {"dst-ip": "10.2.0.1", "once": None})


def test_route_check_streams_until_cancel(raw: Raw) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}, route_check_interval=0.02) as emu:
        client = raw(emu)
        client.send("/ip/route/check", "=dst-ip=1.1.1.1", ".tag=4")
        rows = [client.read() for _ in range(3)]
        assert (
            rows == [("!re", "=status=ok", "=interface=ether1", "=nexthop=192.0.2.1", ".tag=4")] * 3
        )
        emu.state.routes.set("1.1.1.1", interface="wg-proton")
        while client.read()[2] != "=interface=wg-proton":  # the stream follows the oracle
            pass
        assert emu.connections()[0].in_flight == 1
        client.send("/cancel", "=tag=4", ".tag=5")
        tail = [client.read()]
        while tail[-1] != ("!done", ".tag=4"):
            tail.append(client.read())
        tail = [s for s in tail if s[0] != "!re"]  # rows already on the way may precede
        assert tail == [
            ("!trap", "=category=2", "=message=interrupted", ".tag=4"),
            ("!done", ".tag=5"),
            ("!done", ".tag=4"),
        ]
        assert emu.connections()[0].in_flight == 0
        # Nothing more is streamed for tag 4.
        assert client.call("/system/identity/print", ".tag=6") == [
            ("!re", "=name=MikroTik", ".tag=6"),
            ("!done", ".tag=6"),
        ]


def test_route_check_duration_ends_with_done(emulator: RouterOsEmulator, raw: Raw) -> None:
    client = raw(emulator)
    start = time.monotonic()
    reply = client.call("/ip/route/check", "=dst-ip=1.1.1.1", "=interval=20ms", "=duration=50ms")
    assert time.monotonic() - start >= 0.05
    kinds = [s[0] for s in reply]
    assert kinds[-1] == "!done" and set(kinds[:-1]) == {"!re"} and 2 <= len(kinds) - 1 <= 3


def test_cancel_without_tag_interrupts_a_stall(emulator: RouterOsEmulator, raw: Raw) -> None:
    emulator.stall(f"{NAT}/print")
    client = raw(emulator)
    client.send(f"{NAT}/print", ".tag=1")
    gevent.sleep(0.02)
    client.send("/cancel", ".tag=2")
    assert client.until_done("1") == [
        ("!trap", "=category=2", "=message=interrupted", ".tag=1"),
        ("!done", ".tag=2"),
        ("!done", ".tag=1"),
    ]
    # The fault fired once; the worker is free again.
    assert client.call(f"{NAT}/print", "=count-only")[-1] == ("!done", "=ret=0")


def test_quit(emulator: RouterOsEmulator, raw: Raw, connect: Connect) -> None:
    client = raw(emulator)
    client.send("/quit", ".tag=9")
    assert client.read() == ("!fatal", "session terminated on request")
    assert client.closed_by_peer()
    # routeros-api cannot parse the real !fatal format: it sees a malformed attribute.
    _, api = connect(emulator)
    with pytest.raises(exceptions.RouterOsApiParsingError):
        api.get_binary_resource("/").call("quit")


def test_identity_and_resource(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    identity = api.get_resource("/system/identity")
    assert identity.get() == [{"name": "MikroTik"}]
    identity.call("set", {"name": "edge"})
    assert emulator.state.identity == "edge"
    resource = api.get_resource("/system/resource").get()
    assert len(resource) == 1
    assert resource[0]["version"] == "7.21.4 (stable)"
    assert resource[0]["board-name"] == "CHR"
    assert "id" not in resource[0]
    assert resource[0]["uptime"].startswith("1d")  # the emulated router has been up a day
    emulator.state.resource["cpu-load"] = "77"
    assert api.get_resource("/system/resource").get()[0]["cpu-load"] == "77"
    interfaces = api.get_resource("/interface").get()
    # Interfaces print in the order they were made, as RouterOS lists them by id.
    assert [(i["name"], i["type"]) for i in interfaces] == [
        ("ether1", "ether"),
        ("bridge", "bridge"),
        ("wg-proton", "wg"),
    ]


def test_observer_hears_api_changes(emulator: RouterOsEmulator, connect: Connect) -> None:
    heard: list[tuple[str, str]] = []
    emulator.state.nat.add_observer(lambda kind, row: heard.append((kind, row["dst-port"])))
    _, api = connect(emulator)
    nat = api.get_resource(NAT)
    nat.add(**kw(dstnat(5000)))
    nat.set(id="*1", dst_port="5001")
    nat.remove(id="*1")
    assert heard == [("add", "5000"), ("set", "5001"), ("remove", "5001")]


# ======================================================================================
# Transcript and counters
# ======================================================================================


def test_transcript_counters_writes_and_reads(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    emulator.reset_counters()
    emulator.clear_transcript()
    nat = api.get_resource(NAT)
    nat.add(**kw(dstnat(1)))
    assert emulator.writes() == 1
    assert emulator.reads() == 0
    nat.get()
    api.get_resource("/ip/route").call("check", {"dst-ip": "1.1.1.1", "once": None})
    api.get_resource("/system/identity").get()
    assert (emulator.writes(), emulator.reads()) == (1, 2)
    assert emulator.counters.commands[f"{NAT}/add"] == 1
    adds = emulator.sent(f"{NAT}/add")
    assert len(adds) == 1
    assert "=comment=double-natpmp-tcp-1" in adds[0].words
    out = [e for e in emulator.transcript if e.direction == "out"]
    assert out[0].words[:2] == ("!done", "=ret=*1")
    assert {e.connection for e in emulator.transcript} == {1}
    times = [e.at for e in emulator.transcript]
    assert times == sorted(times)
    emulator.reset_counters()
    assert (emulator.writes(), emulator.reads()) == (0, 0)
    assert emulator.counters.connections_open == 1


def test_connection_counters(emulator: RouterOsEmulator, connect: Connect) -> None:
    first, _ = connect(emulator)
    connect(emulator)
    c = emulator.counters
    assert (c.connections_accepted, c.connections_open, c.max_connections_open) == (2, 2, 2)
    first.disconnect()
    deadline = time.monotonic() + 2
    while emulator.counters.connections_open != 1 and time.monotonic() < deadline:
        gevent.sleep(0.005)
    assert (c.connections_open, c.max_connections_open, c.disconnects) == (1, 2, 1)


def test_real_client_never_pipelines(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.latency = 0.002
    _, api = connect(emulator)
    nat = api.get_resource(NAT)
    for port in range(5):
        nat.add(**kw(dstnat(port)))
        nat.get(dst_port=str(port))
    assert emulator.counters.max_in_flight_by_connection == {1: 1}


def test_shared_connection_shows_two_in_flight(
    emulator: RouterOsEmulator, connect: Connect
) -> None:
    # Two greenlets on one routeros-api connection: the second send still reaches the router.
    emulator.latency = 0.05
    _, api = connect(emulator)
    nat = api.get_resource(NAT)
    jobs = [gevent.spawn(nat.get), gevent.spawn(nat.get)]
    gevent.joinall(jobs, timeout=2)
    assert emulator.counters.max_in_flight == 2
    assert sum(1 for j in jobs if isinstance(j.exception, AssertionError)) == 1


def test_latency_and_delay(emulator: RouterOsEmulator, connect: Connect) -> None:
    _, api = connect(emulator)
    identity = api.get_resource("/system/identity")

    def timed(call: Callable[[], object]) -> float:
        start = time.monotonic()
        call()
        return time.monotonic() - start

    baseline = timed(identity.get)
    emulator.latency = 0.08
    assert timed(identity.get) >= 0.08
    emulator.latency = 0.0
    emulator.delay(0.1, f"{NAT}/add")
    nat = api.get_resource(NAT)
    assert timed(lambda: nat.add(**kw(dstnat(1)))) >= 0.1
    assert timed(identity.get) < 0.05 + baseline
    assert timed(lambda: nat.add(**kw(dstnat(2)))) < 0.05  # the delay was for one command


# ======================================================================================
# Faults
# ======================================================================================


def test_execute_then_drop_leaves_the_rule(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.execute_then_drop(f"{NAT}/add")
    pool, api = connect(emulator)
    with pytest.raises(exceptions.RouterOsApiConnectionClosedError):
        api.get_resource(NAT).add(**kw(dstnat(1)))
    assert not pool.connected
    assert [r["comment"] for r in emulator.state.nat.rows()] == ["double-natpmp-tcp-1"]
    # The reconnect sees the rule; the fault was for one command only.
    api = pool.get_api()
    assert api.get_resource(NAT).get(comment="double-natpmp-tcp-1")[0]["id"] == "*1"


def test_drop_before_reply_does_not_execute(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.drop_before_reply(f"{NAT}/add")
    _, api = connect(emulator)
    with pytest.raises(exceptions.RouterOsApiConnectionClosedError):
        api.get_resource(NAT).add(**kw(dstnat(1)))
    assert len(emulator.state.nat) == 0


def test_drop_mid_reply(emulator: RouterOsEmulator, connect: Connect, raw: Raw) -> None:
    emulator.state.nat.add(dstnat(1))
    emulator.drop_mid_reply(f"{NAT}/print", times=2)
    _, api = connect(emulator)
    with pytest.raises(exceptions.RouterOsApiConnectionClosedError):
        api.get_resource(NAT).get()
    client = raw(emulator)
    client.send(f"{NAT}/print", ".tag=1")
    received = b""
    while chunk := client.sock.recv(4096):
        received += chunk
    assert len(received) > 0 and not SentenceReader().feed(received)  # no complete sentence


def test_fatal_with_reason(emulator: RouterOsEmulator, connect: Connect, raw: Raw) -> None:
    emulator.fatal("out of memory", f"{NAT}/add", times=None)
    client = raw(emulator)
    client.send(f"{NAT}/add", "=chain=dstnat", ".tag=1")
    assert client.read() == ("!fatal", "out of memory")
    assert client.closed_by_peer()
    pool, api = connect(emulator)
    with pytest.raises(exceptions.RouterOsApiParsingError):
        api.get_resource(NAT).add(**kw(dstnat(1)))
    assert pool.connected  # the library does not notice; callers must disconnect
    assert len(emulator.state.nat) == 0


def test_stall_hits_the_socket_timeout(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.stall("/system/identity/print")
    pool, api = connect(emulator, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(exceptions.RouterOsApiConnectionError, match="timed out"):
        api.get_resource("/system/identity").get()
    assert time.monotonic() - start >= 0.2
    assert not pool.connected


def test_trap_faults(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.trap("failure: already have such rule", f"{NAT}/add", attrs={"dst-port": "2"})
    pool, api = connect(emulator)
    nat = api.get_resource(NAT)
    nat.add(**kw(dstnat(1)))  # attrs did not match
    with pytest.raises(exceptions.RouterOsApiCommunicationError, match="already have such"):
        nat.add(**kw(dstnat(2)))
    assert [r["dst-port"] for r in emulator.state.nat.rows()] == ["1"]
    emulator.trap_without_message(f"{NAT}/print")
    with pytest.raises(KeyError):
        nat.get()
    assert pool.connected


def test_fault_counts_and_connection_match(emulator: RouterOsEmulator, raw: Raw) -> None:
    fault = emulator.trap("busy", "/system/*", times=2)
    client = raw(emulator)
    assert client.call("/system/identity/print")[0] == ("!trap", "=message=busy")
    assert client.call("/system/resource/print")[0] == ("!trap", "=message=busy")
    assert client.call("/system/identity/print")[0] == ("!re", "=name=MikroTik")
    assert (fault.hits, fault.remaining, fault.active) == (2, 0, False)
    other = raw(emulator)
    forever = emulator.inject(FaultKind.TRAP, message="only you", connection=2, times=None)
    assert client.call("/system/identity/print")[0][0] == "!re"
    for _ in range(3):
        assert other.call("/system/identity/print")[0] == ("!trap", "=message=only you")
    forever.cancel()
    assert other.call("/system/identity/print")[0][0] == "!re"
    assert emulator.counters.faults_fired == 5


def test_rst_instead_of_fin(emulator: RouterOsEmulator, connect: Connect, raw: Raw) -> None:
    emulator.drop_before_reply("/system/identity/print", rst=True, times=2)
    client = raw(emulator)
    client.send("/system/identity/print")
    with pytest.raises(ConnectionResetError):
        client.sock.recv(10)
    _, api = connect(emulator)
    with pytest.raises(exceptions.RouterOsApiConnectionError, match="reset"):
        api.get_resource("/system/identity").get()


def test_raw_bytes_fault(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.raw(encode_sentence([b"!done", b".tag=99"]), "/system/identity/print")
    pool, api = connect(emulator)
    with pytest.raises(exceptions.FatalRouterOsApiError, match="Unknown tag"):
        api.get_resource("/system/identity").get()
    assert not pool.connected


def test_refuse_and_router_down_up(emulator: RouterOsEmulator, connect: Connect) -> None:
    emulator.state.nat.add(dstnat(1))
    pool, api = connect(emulator)
    emulator.refuse_connections()
    with pytest.raises(exceptions.RouterOsApiConnectionError):
        connect(emulator)
    assert emulator.counters.connections_refused == 1
    emulator.refuse_connections(None)
    emulator.router_down()
    with pytest.raises(exceptions.RouterOsApiConnectionError):
        api.get_resource(NAT).get()
    with pytest.raises(exceptions.RouterOsApiConnectionError):
        pool.get_api()  # connection refused while down
    emulator.router_up()
    api = pool.get_api()
    assert [r["id"] for r in api.get_resource(NAT).get()] == ["*1"]


def test_drop_all_connections_keeps_state(emulator: RouterOsEmulator, connect: Connect) -> None:
    pools = [connect(emulator)[0] for _ in range(3)]
    pools[0].get_api().get_resource(NAT).add(**kw(dstnat(1)))
    emulator.drop_all_connections()
    assert emulator.counters.connections_open == 0
    for pool in pools:
        with pytest.raises(exceptions.RouterOsApiConnectionError):
            pool.get_api().get_resource(NAT).get()
    assert len(pools[1].get_api().get_resource(NAT).get()) == 1


def test_max_sessions(connect: Connect) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}, max_sessions=1) as emu:
        first, _ = connect(emu)
        with pytest.raises(exceptions.RouterOsApiConnectionError):
            connect(emu)
        assert emu.counters.connections_refused == 1
        first.disconnect()
        deadline = time.monotonic() + 2
        while emu.counters.connections_open and time.monotonic() < deadline:
            gevent.sleep(0.005)
        connect(emu)


def test_protocol_error_closes_the_connection(emulator: RouterOsEmulator, raw: Raw) -> None:
    client = raw(emulator)
    client.sock.sendall(b"\xf8")
    assert client.closed_by_peer()
    assert emulator.counters.protocol_errors == 1


# ======================================================================================
# TLS
# ======================================================================================


def test_api_ssl_with_test_ca(
    connect: Connect, server_tls_context: ssl.SSLContext, test_ca: dict[str, object]
) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}, ssl_context=server_tls_context) as emu:
        assert emu.tls_address is not None and emu.tls_address != emu.address
        client_context = ssl.create_default_context(cafile=str(test_ca["ca"]))
        _, api = connect(emu, address=emu.tls_address, ssl_context=client_context)
        api.get_resource(NAT).add(**kw(dstnat(1)))
        assert emu.connections()[0].tls
        assert len(emu.state.nat) == 1
        # Without the CA the certificate is refused, and routeros-api does not wrap that.
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(emu, address=emu.tls_address, use_ssl=True)
        # The plain port keeps working next to the TLS one.
        connect(emu)


def test_ignore_connections_never_answers_login(
    emulator: RouterOsEmulator, connect: Connect
) -> None:
    emulator.refuse_connections("ignore")
    with pytest.raises(exceptions.RouterOsApiConnectionError, match="timed out"):
        connect(emulator, timeout=0.1)
    assert emulator.counters.connections_accepted == 0
    emulator.refuse_connections(None)
    connect(emulator)
