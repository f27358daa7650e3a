"""ServerConfig, parse_mode, parse_duration and from_mapping (src/unixsrv/config.py).

docs/design.md "ServerConfig" and "Precise semantics / Validation, from_mapping":
every value is validated when the config is built, a rejected config leaves
nothing on disk, and each rejection is the specific ConfigError subclass
(which is also a ValueError).  golib sources: spec a.2 (socket/config.Server,
keys network/address/perm-file/group-perm/con-idle-timeout/tls), a.3
(file/perm parsing), weaknesses W6 (abstract names), W20 (network not
enforced), W21 (MaxGID 32767).  Checklist items 9, 10, 14, 17.
"""

from __future__ import annotations

import dataclasses
import datetime
import grp
import os
import pathlib
import stat
import subprocess
import sys
import sysconfig

import pytest

import unixsrv
from conftest import connect, echo_handler, echo_once, recv_exactly
from unixsrv import ConfigError, InvalidGroupError, InvalidPathError, ServerConfig
from unixsrv._core import (
    HAVE_ABSTRACT,
    SUN_PATH_MAX,
)  # 107 on Linux (sun_path 108), 103 on macOS (104)
from unixsrv.config import DEFAULT_MODE, MAX_GID, parse_duration, parse_mode
from unixsrv.errors import InvalidModeError


def rejects(exc_class: type[ConfigError], **fields):
    """Build ServerConfig(**fields), assert it raises exactly ``exc_class`` (a
    ConfigError that is also a ValueError) and return the exception."""
    with pytest.raises(exc_class) as info:
        ServerConfig(**fields)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, ValueError)
    return info.value


def path_of_length(directory: str, total: int) -> str:
    """A path inside ``directory`` whose encoded length is exactly ``total`` bytes."""
    prefix = directory + "/"
    assert len(prefix) < total
    path = prefix + "p" * (total - len(prefix))
    assert len(os.fsencode(path)) == total
    return path


def abstract_name(sock_dir: str, suffix: str = "") -> str:
    """A unique abstract name ('@...') derived from the test's private directory."""
    return "@unixsrv-test" + sock_dir.replace("/", "-") + suffix


# ---------------------------------------------------------------------- path


class TestPath:
    def test_plain_str_path_is_kept(self, sock_path):
        """A filesystem path is stored unchanged and is not abstract."""
        cfg = ServerConfig(path=sock_path)
        assert cfg.path == sock_path
        assert cfg.is_abstract is False
        assert cfg.address == os.fsencode(sock_path)
        assert cfg.display_path == sock_path

    def test_pathlike_is_accepted(self, sock_path):
        """os.PathLike paths are accepted (docs/design.md: str | bytes | os.PathLike)."""
        cfg = ServerConfig(path=pathlib.Path(sock_path))
        assert os.fspath(cfg.path) == sock_path
        assert cfg.address == os.fsencode(sock_path)
        assert cfg.display_path == sock_path

    def test_bytes_path_is_accepted(self, sock_path):
        """A bytes path works; display_path is its text."""
        cfg = ServerConfig(path=os.fsencode(sock_path))
        assert cfg.address == os.fsencode(sock_path)
        assert cfg.display_path == sock_path
        assert cfg.is_abstract is False

    @pytest.mark.parametrize("empty", ["", b""])
    def test_empty_path_rejected(self, empty):
        """golib ErrInvalidUnixFile for an empty address (spec b.2); here InvalidPathError."""
        rejects(InvalidPathError, path=empty)

    @pytest.mark.parametrize("bad", [None, 123, 1.5, ["/tmp/x"]])
    def test_non_path_types_rejected(self, bad):
        """Only str, bytes and os.PathLike are paths."""
        rejects(InvalidPathError, path=bad)

    @pytest.mark.parametrize("bad", ["/tmp/a\0b", b"/x\0y", "/tmp/x\0"])
    def test_nul_in_filesystem_path_rejected(self, bad):
        """Checklist 10: embedded NUL in a filesystem path -> ValueError."""
        rejects(InvalidPathError, path=bad)

    def test_path_of_107_bytes_is_accepted_and_binds(self, sock_dir, make_server):
        """Checklist 9: a path of SUN_PATH_MAX bytes (the sun_path limit: 107 on
        Linux, 103 on macOS) is valid and serves."""
        path = path_of_length(sock_dir, SUN_PATH_MAX)
        cfg = ServerConfig(path=path)
        assert cfg.address == os.fsencode(path)
        srv = make_server(cfg, echo_handler)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        echo_once(path, b"max")
        srv.close()
        assert not os.path.lexists(path)

    @pytest.mark.parametrize("extra", [1, 50])
    def test_path_longer_than_sun_path_rejected_nothing_created(self, sock_dir, extra):
        """Checklist 9: SUN_PATH_MAX + 1 or more bytes (108+ on Linux) -> ValueError
        naming the limit, nothing created on disk."""
        path = path_of_length(sock_dir, SUN_PATH_MAX + extra)
        exc = rejects(InvalidPathError, path=path)
        assert str(SUN_PATH_MAX) in str(exc)
        exc = rejects(InvalidPathError, path=os.fsencode(path))
        assert os.listdir(sock_dir) == []

    def test_length_counts_encoded_bytes_not_characters(self, sock_dir):
        """The limit is on bytes: 2-byte UTF-8 characters count twice."""
        prefix = sock_dir + "/"
        n_chars = (SUN_PATH_MAX - len(prefix)) // 2 + 1  # fits in characters, not in bytes
        path = prefix + "é" * n_chars
        assert len(path) <= SUN_PATH_MAX < len(os.fsencode(path))
        rejects(InvalidPathError, path=path)
        assert os.listdir(sock_dir) == []

    @pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
    def test_path_must_name_a_file(self, sock_dir, suffix):
        """A trailing slash, '.' or '..' names a directory, never a socket file."""
        rejects(InvalidPathError, path=sock_dir + suffix)
        rejects(InvalidPathError, path=os.fsencode(sock_dir + suffix))

    def test_building_a_config_touches_nothing(self, sock_path, sock_dir):
        """docs/design.md: ServerConfig only validates; start() checks the filesystem."""
        ServerConfig(path=sock_path, mode="0600", group=0)
        assert os.listdir(sock_dir) == []


@pytest.mark.linux("abstract socket names")
class TestAbstract:
    @pytest.mark.parametrize("name", ["@x", b"@x", "\0x", b"\0x"])
    def test_abstract_forms(self, name):
        """W6 fixed: '@name' and NUL+name select the Linux abstract namespace."""
        cfg = ServerConfig(path=name)
        assert cfg.is_abstract is True
        assert cfg.address == b"\0x"
        assert cfg.display_path == "@x"
        assert cfg.mode == 0  # no file, no permission bits (typed int: see TestTyping)
        assert cfg.group is None

    @pytest.mark.parametrize("name", ["@", b"@", "\0", b"\0"])
    def test_abstract_name_needs_a_character(self, name):
        """An abstract name with nothing after the marker is rejected."""
        rejects(InvalidPathError, path=name)

    @pytest.mark.parametrize("marker", ["@", "\0"])
    def test_abstract_name_length_limit(self, marker):
        """Abstract names use all 108 bytes of sun_path (NUL + 107, no terminator)."""
        ok = ServerConfig(path=marker + "n" * SUN_PATH_MAX)
        assert ok.address == b"\0" + b"n" * SUN_PATH_MAX
        rejects(InvalidPathError, path=marker + "n" * (SUN_PATH_MAX + 1))
        rejects(InvalidPathError, path=os.fsencode(marker) + b"n" * (SUN_PATH_MAX + 1))

    def test_abstract_names_are_length_exact(self):
        """Checklist 10: b'\\0n' and b'\\0n\\0' are different names (no NUL stripping)."""
        a = ServerConfig(path=b"\0n")
        b = ServerConfig(path=b"\0n\0")
        assert a.address == b"\0n"
        assert b.address == b"\0n\0"
        assert ServerConfig(path="@n\0").address == b"\0n\0"

    def test_abstract_names_differing_by_trailing_nul_are_independent(self, sock_dir, make_server):
        """Checklist 10: two listeners on b'\\0name' and b'\\0name\\0' coexist and are distinct."""
        base = os.fsencode(abstract_name(sock_dir)[1:])
        first = make_server(ServerConfig(path=b"\0" + base), lambda conn: conn.write(b"1"))
        second = make_server(ServerConfig(path=b"\0" + base + b"\0"), lambda conn: conn.write(b"2"))
        assert first.is_running and second.is_running
        with connect(b"\0" + base) as s:
            assert recv_exactly(s, 1) == b"1"
        with connect(b"\0" + base + b"\0") as s:
            assert recv_exactly(s, 1) == b"2"

    @pytest.mark.parametrize("mode", [0o660, "0660", 0])
    def test_mode_must_be_none_for_abstract(self, mode):
        """Checklist 17: an abstract socket has no file, so no mode."""
        rejects(InvalidModeError, path="@x", mode=mode)

    @pytest.mark.parametrize("group", [0, "root"])
    def test_group_must_be_none_for_abstract(self, group):
        """Checklist 17: an abstract socket has no file, so no group."""
        rejects(InvalidGroupError, path="@x", group=group)


# ---------------------------------------------------------------------- mode


class TestMode:
    def test_default_mode_is_golib_0770(self, sock_path):
        """golib spec b.3: perm 0 / unset -> 0770; docs/design.md keeps that default."""
        assert DEFAULT_MODE == 0o770
        assert ServerConfig(path=sock_path).mode == 0o770

    @pytest.mark.parametrize(
        "value",
        [
            0o660,
            "0660",
            "660",
            "0o660",
            "rw-rw----",
            "srw-rw----",
            "-rw-rw----",
            " 0660 ",
            '"0660"',
            "'rw-rw----'",
        ],
    )
    def test_mode_forms(self, sock_path, value):
        """docs/design.md: int or "0660"/"660"/"rw-rw----"; golib a.3 also strips quotes and
        accepts a 10-character form with a file-type letter."""
        cfg = ServerConfig(path=sock_path, mode=value)
        assert cfg.mode == 0o660
        assert type(cfg.mode) is int

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("rwxr-x---", 0o750),
            ("rwx------", 0o700),
            ("---------", 0),
            ("rwxrwxrwx", 0o777),
            ("0600", 0o600),
            ("7", 0o7),
            (0o600, 0o600),
            (0, 0),
            ("0777", 0o777),
        ],
    )
    def test_mode_values(self, sock_path, value, expected):
        """Octal and symbolic permissions parse to the matching bits."""
        assert ServerConfig(path=sock_path, mode=value).mode == expected
        assert parse_mode(value) == expected

    @pytest.mark.parametrize(
        "value",
        [
            0o1000,
            0o4755,
            -1,
            "1777",
            "0o1777",
            "999",
            "0668",
            "rw-rw-rw",
            "rw-rw-rw--",
            "xrw-rw----",
            "rwxrwxrwz",
            "",
            "0x1b6",
            "abc",
            "0o",
            1.5,
            b"0660",
            [0o660],
        ],
    )
    def test_bad_modes_rejected(self, sock_path, value):
        """Out of range (setuid/sticky bits included), malformed or wrong type -> InvalidModeError."""
        rejects(InvalidModeError, path=sock_path, mode=value)
        with pytest.raises(InvalidModeError):
            parse_mode(value)

    @pytest.mark.parametrize("value", [True, False])
    def test_bool_mode_rejected(self, sock_path, value):
        """bool is an int subclass, but True is not a permission."""
        rejects(InvalidModeError, path=sock_path, mode=value)


# ---------------------------------------------------------------------- group


def _other_group() -> grp.struct_group:
    """A group of this machine other than root."""
    for g in grp.getgrall():
        if g.gr_gid != 0 and g.gr_name.isidentifier():
            return g
    raise AssertionError("this machine has no group besides root")


class TestGroup:
    def test_default_group_is_none(self, sock_path):
        """None leaves the process's group (golib group-perm -1)."""
        assert ServerConfig(path=sock_path).group is None

    @pytest.mark.parametrize("gid", [0, 1, 32767, 32768, 65534, 65536, 2**31, MAX_GID])
    def test_gid_range_accepted(self, sock_path, gid):
        """Checklist 14 and W21: every gid 0..4294967294 is valid, not capped at 32767."""
        assert MAX_GID == 4294967294
        assert ServerConfig(path=sock_path, group=gid).group == gid

    @pytest.mark.parametrize("gid", [-1, -2, -(2**31), 4294967295, 2**32, 2**40, True, False, 1.0])
    def test_bad_gids_rejected(self, sock_path, gid):
        """Checklist 14: -1, 2**32-1 (chown's "unchanged"), negatives, bool and floats are refused."""
        rejects(InvalidGroupError, path=sock_path, group=gid)

    def test_group_name_root_resolved_at_build(self, sock_path):
        """docs/design.md: a group name is resolved when the config is built (gid 0's
        name: "root" on Linux, "wheel" on macOS)."""
        cfg = ServerConfig(path=sock_path, group=grp.getgrgid(0).gr_name)
        assert cfg.group == 0
        assert type(cfg.group) is int

    def test_other_group_name_resolved(self, sock_path):
        """Any group of this machine resolves to its gid."""
        g = _other_group()
        cfg = ServerConfig(path=sock_path, group=g.gr_name)
        assert cfg.group == g.gr_gid
        assert type(cfg.group) is int

    def test_unknown_group_name_rejected(self, sock_path, sock_dir):
        """An unknown group name -> InvalidGroupError at build time, nothing on disk."""
        exc = rejects(InvalidGroupError, path=sock_path, group="no-such-group-unixsrv")
        assert "no-such-group-unixsrv" in str(exc)
        assert os.listdir(sock_dir) == []

    @pytest.mark.parametrize(
        ("text", "gid"), [("65534", 65534), ("4294967294", MAX_GID), ("40000", 40000)]
    )
    def test_numeric_string_is_a_gid(self, sock_path, text, gid):
        """A numeric string that names no group is a gid."""
        try:
            grp.getgrnam(text)
        except KeyError:
            pass
        else:
            raise AssertionError(f"a group is literally named {text!r} on this machine")
        assert ServerConfig(path=sock_path, group=text).group == gid

    @pytest.mark.parametrize("text", ["4294967295", "-1", "99999999999"])
    def test_numeric_string_out_of_range_rejected(self, sock_path, text):
        """Numeric strings obey the same range as ints."""
        rejects(InvalidGroupError, path=sock_path, group=text)


# ---------------------------------------------------------------------- idle timeout


class TestIdleTimeout:
    @pytest.mark.parametrize("off", [None, 0, 0.0, "0", "0s", datetime.timedelta(0)])
    def test_zero_or_none_means_off(self, sock_path, off):
        """docs/design.md: None/0 = off (stored as None)."""
        assert ServerConfig(path=sock_path, idle_timeout=off).idle_timeout is None

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (0.05, 0.05),
            (0.5, 0.5),
            (2, 2.0),
            (300, 300.0),
            (datetime.timedelta(seconds=1.5), 1.5),
            (datetime.timedelta(milliseconds=250), 0.25),
            ("5m", 300.0),
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("250ms", 0.25),
        ],
    )
    def test_values(self, sock_path, value, seconds):
        """Sub-second values are kept (W18); timedelta and Go duration strings work."""
        cfg = ServerConfig(path=sock_path, idle_timeout=value)
        assert cfg.idle_timeout == pytest.approx(seconds)
        assert type(cfg.idle_timeout) is float

    @pytest.mark.parametrize(
        "value",
        [
            -1,
            -0.001,
            "-1s",
            datetime.timedelta(seconds=-1),
            float("nan"),
            float("inf"),
            "soon",
            "5",
            True,
            [1],
        ],
    )
    def test_bad_values_rejected(self, sock_path, value):
        """Negative, non-finite, unit-less or unparsable durations -> ConfigError."""
        rejects(ConfigError, path=sock_path, idle_timeout=value)


# ---------------------------------------------------------------------- sizes


class TestLimits:
    def test_defaults(self, sock_path):
        """Sensible defaults; write_buffer_low defaults to high // 4."""
        cfg = ServerConfig(path=sock_path)
        assert cfg.backlog == 1024
        assert cfg.max_connections is None
        assert cfg.read_buffer_size == 65536
        assert cfg.write_buffer_high == 65536
        assert cfg.write_buffer_low == 65536 // 4
        assert cfg.max_write_buffer >= cfg.write_buffer_high

    @pytest.mark.parametrize(
        ("field", "good"),
        [
            ("backlog", [1, 128, 1 << 20]),
            ("max_connections", [None, 1, 10_000, 1 << 30]),
            ("read_buffer_size", [256, 4096, 16 * 1024 * 1024]),
            ("write_buffer_high", [0, 1, 65536, 1 << 20]),
        ],
    )
    def test_accepted_bounds(self, sock_path, field, good):
        """Values at and inside the documented bounds are accepted unchanged."""
        for value in good:
            assert getattr(ServerConfig(path=sock_path, **{field: value}), field) == value

    @pytest.mark.parametrize(
        ("field", "bad"),
        [
            ("backlog", [0, -1, (1 << 20) + 1, True, 1.5, "10", None]),
            ("max_connections", [0, -1, (1 << 30) + 1, True, 2.0, "10"]),
            ("read_buffer_size", [0, 255, 16 * 1024 * 1024 + 1, True, 4096.0]),
            ("write_buffer_high", [-1, (1 << 30) + 1, False, 1.0]),
            ("write_buffer_low", [-1, 65537, True, 1.0]),
            ("max_write_buffer", [0, 65535, (1 << 30) + 1, True, 1.0]),
        ],
    )
    def test_rejected_values(self, sock_path, field, bad):
        """Out-of-range, bool, float and string sizes -> ConfigError naming the field."""
        for value in bad:
            exc = rejects(ConfigError, path=sock_path, **{field: value})
            assert field in str(exc), (field, value, exc)

    def test_water_marks(self, sock_path):
        """low <= high is required; an explicit low is kept."""
        cfg = ServerConfig(
            path=sock_path, write_buffer_high=1000, write_buffer_low=1000, max_write_buffer=1000
        )
        assert (cfg.write_buffer_low, cfg.write_buffer_high, cfg.max_write_buffer) == (
            1000,
            1000,
            1000,
        )
        assert ServerConfig(path=sock_path, write_buffer_high=1000).write_buffer_low == 250
        rejects(ConfigError, path=sock_path, write_buffer_high=1000, write_buffer_low=1001)
        rejects(
            ConfigError, path=sock_path, write_buffer_high=1 << 20, max_write_buffer=(1 << 20) - 1
        )


# ---------------------------------------------------------------------- dataclass shape


class TestShape:
    def test_frozen(self, sock_path):
        """docs/design.md: a frozen dataclass."""
        cfg = ServerConfig(path=sock_path)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.path = "/tmp/other"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.mode = 0o600  # type: ignore[misc]
        assert cfg.path == sock_path and cfg.mode == 0o770

    def test_keyword_only(self, sock_path):
        """docs/design.md: keyword-only; path is required."""
        with pytest.raises(TypeError):
            ServerConfig(sock_path)  # type: ignore[misc]
        with pytest.raises(TypeError):
            ServerConfig()  # type: ignore[call-arg]

    def test_equal_configs_compare_and_hash_equal(self, sock_path):
        """Normalised values make equivalent configs equal (and hashable, being frozen)."""
        a = ServerConfig(path=sock_path, mode="rw-rw----", idle_timeout="500ms", group="root")
        b = ServerConfig(path=sock_path, mode=0o660, idle_timeout=0.5, group=0)
        assert a == b
        assert hash(a) == hash(b)

    def test_replace_revalidates(self, sock_path):
        """dataclasses.replace builds a new config, validated like any other."""
        cfg = ServerConfig(path=sock_path)
        assert dataclasses.replace(cfg, mode="0600").mode == 0o600
        with pytest.raises(InvalidModeError):
            dataclasses.replace(cfg, mode="bogus")

    def test_derived_properties(self, sock_path):
        """is_abstract / address / display_path for each kind of path (where
        there are no abstract names, both abstract forms are InvalidPathError)."""
        fs = ServerConfig(path=sock_path)
        assert (fs.is_abstract, fs.address, fs.display_path) == (
            False,
            os.fsencode(sock_path),
            sock_path,
        )
        if not HAVE_ABSTRACT:
            for name in ("@svc.name", b"\0svc\xff"):
                with pytest.raises(InvalidPathError, match="abstract"):
                    ServerConfig(path=name)
            return
        ab = ServerConfig(path="@svc.name")
        assert (ab.is_abstract, ab.address, ab.display_path) == (True, b"\0svc.name", "@svc.name")
        raw = ServerConfig(path=b"\0svc\xff")
        assert raw.is_abstract and raw.address == b"\0svc\xff"
        assert raw.display_path.startswith("@svc")


# ---------------------------------------------------------------------- parse_mode / parse_duration


class TestParseMode:
    def test_returns_int(self):
        """parse_mode is the helper behind ServerConfig.mode."""
        assert parse_mode("0660") == 0o660
        assert parse_mode("srwxrwx---") == 0o770
        with pytest.raises(InvalidModeError) as info:
            parse_mode("rw-rw-rwz")
        assert isinstance(info.value, ValueError)


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("1d", 86400.0),
            ("1.5s", 1.5),
            ("0", 0.0),
            ("2us", 2e-6),
            ("2µs", 2e-6),
            ("2μs", 2e-6),
            ("3ns", 3e-9),
            ("1h2m3s4ms", 3723.004),
            ("+5s", 5.0),
            (".5s", 0.5),
            ("1.s", 1.0),
            ("2h45m", 9900.0),
            ('"5m"', 300.0),
            ("0s", 0.0),
            ("5m0s", 300.0),
        ],
    )
    def test_go_strings(self, text, seconds):
        """Go time.ParseDuration syntax (plus golib's 'd' unit)."""
        assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [(0, 0.0), (90, 90.0), (0.25, 0.25), (datetime.timedelta(minutes=2), 120.0)],
    )
    def test_numbers_are_seconds(self, value, seconds):
        """Numbers and timedeltas are seconds."""
        assert parse_duration(value) == seconds

    @pytest.mark.parametrize(
        "value",
        [
            "garbage",
            "5",
            "1x",
            "s",
            "ms",
            "1m 30s",
            "1s garbage",
            "1.2.3s",
            "--1s",
            "1e3s",
            True,
            None,
            [1],
            b"1s",
        ],
    )
    def test_garbage_rejected(self, value):
        """Unparsable durations -> ConfigError (a ValueError)."""
        with pytest.raises(ConfigError) as info:
            parse_duration(value)
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize(
        "value", ["-1s", "-500ms", -1, -0.5, datetime.timedelta(seconds=-3), float("inf")]
    )
    def test_negative_or_infinite_rejected(self, value):
        """A duration must be finite and >= 0."""
        with pytest.raises(ConfigError):
            parse_duration(value)


# ---------------------------------------------------------------------- from_mapping (golib keys)


class TestFromMapping:
    def test_golib_minimal(self, sock_path):
        """spec a.2: network 'unix' + address is a complete golib config; perm 0770 by default."""
        cfg = ServerConfig.from_mapping({"network": "unix", "address": sock_path})
        assert cfg == ServerConfig(path=sock_path)
        assert cfg.mode == 0o770
        assert cfg.group is None
        assert cfg.idle_timeout is None

    def test_golib_full(self, sock_path):
        """All golib keys together (golib's Example_complete shape)."""
        cfg = ServerConfig.from_mapping(
            {
                "network": "unix",
                "address": sock_path,
                "perm-file": "0660",
                "group-perm": 0,
                "con-idle-timeout": "5m",
                "tls": {"enabled": False, "config": {}},
            }
        )
        assert (cfg.path, cfg.mode, cfg.group, cfg.idle_timeout) == (sock_path, 0o660, 0, 300.0)

    @pytest.mark.parametrize("network", ["unix", "Unix", " unix ", '"unix"'])
    def test_network_unix_accepted(self, sock_path, network):
        """golib protocol.Parse lowercases, trims spaces and quotes."""
        assert (
            ServerConfig.from_mapping({"network": network, "address": sock_path}).path == sock_path
        )

    @pytest.mark.parametrize("network", ["tcp", "tcp4", "udp", "ip", "unixgram", "", "bogus", 1])
    def test_other_networks_rejected(self, sock_path, network):
        """W20: golib accepts TCP/UDP/unixgram configs and builds a unix stream server anyway."""
        with pytest.raises(ConfigError) as info:
            ServerConfig.from_mapping({"network": network, "address": sock_path})
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize("perm", [0, "0", None])
    def test_perm_file_zero_is_default(self, sock_path, perm):
        """spec a.2: perm-file 0 means 'use default 0770'."""
        assert ServerConfig.from_mapping({"address": sock_path, "perm-file": perm}).mode == 0o770

    @pytest.mark.parametrize(
        ("perm", "mode"),
        [
            ("0660", 0o660),
            ("660", 0o660),
            ("rw-------", 0o600),
            (0o640, 0o640),
            ("srw-rw----", 0o660),
        ],
    )
    def test_perm_file_values(self, sock_path, perm, mode):
        """perm-file takes golib's string forms (and ints)."""
        assert ServerConfig.from_mapping({"address": sock_path, "perm-file": perm}).mode == mode

    def test_perm_file_bad(self, sock_path):
        """A bad perm-file is InvalidModeError."""
        with pytest.raises(InvalidModeError):
            ServerConfig.from_mapping({"address": sock_path, "perm-file": "rwx"})

    @pytest.mark.parametrize("gid", [-1, "-1"])
    def test_group_perm_minus_one_is_process_group(self, sock_path, gid):
        """spec a.2: group-perm -1 = the process's group (None)."""
        assert ServerConfig.from_mapping({"address": sock_path, "group-perm": gid}).group is None

    @pytest.mark.parametrize("gid", [0, 32767, 32768, 65534, 100000, 2**31, MAX_GID])
    def test_group_perm_above_golib_max_accepted(self, sock_path, gid):
        """W21: golib's MaxGID = 32767 rejects real gids such as 65534; unixsrv does not."""
        assert ServerConfig.from_mapping({"address": sock_path, "group-perm": gid}).group == gid

    @pytest.mark.parametrize("gid", [-2, 4294967295, True, 1.5, "staff-ish", "", None, [0]])
    def test_group_perm_bad(self, sock_path, gid):
        """group-perm is an integer gid; anything else -> InvalidGroupError."""
        with pytest.raises(InvalidGroupError) as info:
            ServerConfig.from_mapping({"address": sock_path, "group-perm": gid})
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            ("5m", 300.0),
            ("1m30s", 90.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("1d", 86400.0),
            (2, 2.0),
            (0.25, 0.25),
            (0, None),
            ("0", None),
            ("0s", None),
        ],
    )
    def test_con_idle_timeout(self, sock_path, value, seconds):
        """con-idle-timeout: Go duration strings or seconds as numbers; 0 = off."""
        cfg = ServerConfig.from_mapping({"address": sock_path, "con-idle-timeout": value})
        assert cfg.idle_timeout == (None if seconds is None else pytest.approx(seconds))

    @pytest.mark.parametrize("value", ["later", "-5m", -1, "5"])
    def test_con_idle_timeout_bad(self, sock_path, value):
        """Unparsable or negative con-idle-timeout -> ConfigError."""
        with pytest.raises(ConfigError):
            ServerConfig.from_mapping({"address": sock_path, "con-idle-timeout": value})

    @pytest.mark.parametrize("tls", [{"enabled": True}, {"enabled": True, "config": {}}, True])
    def test_tls_enabled_rejected(self, sock_path, tls):
        """docs/design.md: an enabled tls is a ConfigError (never silently run without TLS)."""
        with pytest.raises(ConfigError, match=r"(?i)tls"):
            ServerConfig.from_mapping({"network": "unix", "address": sock_path, "tls": tls})

    @pytest.mark.parametrize(
        "tls", [{"enabled": False}, {"enabled": False, "config": {"x": 1}}, {}, False, None]
    )
    def test_tls_disabled_fine(self, sock_path, tls):
        """A disabled tls section is accepted and ignored."""
        assert ServerConfig.from_mapping({"address": sock_path, "tls": tls}).path == sock_path

    @pytest.mark.parametrize("key", ["enable", "Enabled", "certs", "unknown"])
    def test_unknown_key_in_tls_section_rejected(self, sock_path, key):
        """Issue 8 finding 8: an unknown key inside the tls section (``enable``
        for ``enabled``: TLS silently stayed off) is a ConfigError naming the
        key and the section, like an unknown top-level key."""
        with pytest.raises(ConfigError, match=f"'{key}'.*'tls'"):
            ServerConfig.from_mapping({"address": sock_path, "tls": {key: True}})

    @pytest.mark.parametrize("key", ["perm_file", "listen", "Address", "idle-timeout", "unknown"])
    def test_unknown_key_rejected(self, sock_path, key):
        """Unknown keys -> ConfigError naming the key (a typo never passes silently)."""
        with pytest.raises(ConfigError, match=key):
            ServerConfig.from_mapping({"address": sock_path, key: 1})

    @pytest.mark.parametrize(
        "extra",
        [
            {"path": "/tmp/other.sock"},
            {"mode": "0600", "perm-file": "0660"},
            {"group": 0, "group-perm": 1},
            {"idle_timeout": 1, "con-idle-timeout": "1s"},
        ],
    )
    def test_duplicate_settings_rejected(self, sock_path, extra):
        """A golib key and the field it maps to may not both be given."""
        with pytest.raises(ConfigError):
            ServerConfig.from_mapping({"address": sock_path, **extra})

    @pytest.mark.parametrize("data", [None, [("address", "/tmp/x")], "address=/tmp/x", 42])
    def test_non_mapping_rejected(self, data):
        """from_mapping needs a mapping."""
        with pytest.raises(ConfigError):
            ServerConfig.from_mapping(data)  # type: ignore[arg-type]

    def test_missing_address_rejected(self):
        """No address/path -> InvalidPathError."""
        with pytest.raises(InvalidPathError):
            ServerConfig.from_mapping({"network": "unix", "perm-file": "0660"})

    def test_field_names_accepted(self, sock_path):
        """ServerConfig's own field names work too."""
        cfg = ServerConfig.from_mapping(
            {
                "path": sock_path,
                "mode": "0600",
                "backlog": 16,
                "max_connections": 5,
                "idle_timeout": "2s",
            }
        )
        assert (cfg.mode, cfg.backlog, cfg.max_connections, cfg.idle_timeout) == (0o600, 16, 5, 2.0)

    def test_values_are_validated(self, sock_path, sock_dir):
        """from_mapping validates like the constructor (and creates nothing)."""
        with pytest.raises(InvalidPathError):
            ServerConfig.from_mapping({"address": path_of_length(sock_dir, SUN_PATH_MAX + 1)})
        with pytest.raises(ConfigError):
            ServerConfig.from_mapping({"address": sock_path, "backlog": 0})
        assert os.listdir(sock_dir) == []

    @pytest.mark.linux("abstract socket names")
    def test_abstract_address(self):
        """golib W6: an '@name' address works and keeps mode/group unset."""
        cfg = ServerConfig.from_mapping(
            {"network": "unix", "address": "@golib", "perm-file": 0, "group-perm": -1}
        )
        assert cfg.is_abstract and cfg.mode == 0 and cfg.group is None


# ---------------------------------------------------------------------- static types


_TYPED_USE = """
import datetime
from unixsrv import ServerConfig

cfg = ServerConfig(path="x", idle_timeout="1m30s", mode="0660", group="wheel")
ServerConfig(path=b"@x", idle_timeout=datetime.timedelta(seconds=2), mode=None, group=0)
ServerConfig(path="x", idle_timeout=1.5, mode=0o660, write_buffer_low=None)
mode: int = cfg.mode + 1
gid: int | None = cfg.group
idle: float | None = cfg.idle_timeout
low: int = cfg.write_buffer_low
path: str | bytes = cfg.path
"""


class TestTyping:
    def test_mypy_strict_accepts_inputs_and_normalised_fields(self, tmp_path):
        """Issue 8 finding 9: the constructor takes the documented input types
        ("1m30s", "0660", a group name) and the fields are typed as the
        normalised values (``cfg.mode + 1``), under mypy --strict."""
        try:
            import mypy  # noqa: F401
        except ImportError:
            pytest.skip("mypy is not installed in this interpreter")
        snippet = tmp_path / "typed_use.py"
        snippet.write_text(_TYPED_USE, encoding="utf-8")
        src = os.path.dirname(
            os.path.dirname(os.path.abspath(unixsrv.__file__))
        )  # the tree under test
        env = dict(os.environ)
        installed = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
        if os.path.realpath(src) not in installed:
            # A source tree (PYTHONPATH=src): point mypy at it.  An installed
            # package mypy finds by itself, and it refuses site-packages in MYPYPATH.
            env["MYPYPATH"] = src
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--strict",
                "--no-incremental",
                "--cache-dir",
                os.devnull,
                str(snippet),
            ],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.linux("abstract socket names")
    def test_abstract_mode_reads_0(self):
        """The field is an int for every config: 0 for an abstract name, which
        has no file (its mode must still be given as None)."""
        cfg = ServerConfig(path="@typed")
        assert cfg.mode == 0
        assert dataclasses.replace(cfg, path="@other", mode=None).mode == 0
